"""The rollout rank's loop: take commands from the learner's controller over bridge 0, one at a time.

Weights change only between commands, so a generation call never mixes two weight versions. The fully asynchronous
schedule (``schedules/fully_async.py``) streams instead (:class:`_Streaming`): ``admit`` queues prompt groups, the
loop steps the engine between commands while any is in flight, ``poll`` returns the groups finished (scored) so far,
and a ``sync`` that arrives then is loaded between two engine steps (the groups in flight continue under the new
weights). While streaming, the loop looks for a command only when its doorbell rings (``client.doorbell``: a store
counter the controller raises before each command; a posted gloo receive cannot be polled). Every message of the
engine answers a command of the controller (request/response), so the engine never blocks on a send while the
learner pushes weights. The engine is held by a supervisor (``supervisor.py``): an engine that dies or hangs is
restarted with the weights it held and the command repeated (streaming: the groups in flight admitted again); the
controller is told first (``{"event": ...}`` messages before the answer). An engine that cannot be restarted answers
``{"failed": why}`` and waits for the shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Iterator

import torch

from megatron_async_rlhf.cluster import ClusterContext, wait_for_key
from megatron_async_rlhf.rollout.base import EngineSettings, RolloutBackend, build_backend
from megatron_async_rlhf.rollout.client import doorbell
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
    clash = sorted(set(handlers) & {"shutdown", "generate", "score", "sync", *_Streaming.COMMANDS})
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
    streaming = _Streaming(ctx, sup, reward_fn, rc.in_flight_kv, notify)
    while True:
        if failed is None and streaming.groups and not streaming.rung():  # groups in flight: generate until a command
            try:
                streaming.step()
            except EngineGaveUp as e:  # told as the answer to the next command
                failed = str(e)
                log.error("%s", failed)
            continue
        msg = ch.recv_obj(0, "waiting for a command from the learner", timeout_s=ctx.cfg.idle_timeout_s)
        cmd = msg["cmd"]
        streaming.received(cmd)
        stats["restarts"] = sup.restarts
        if cmd == "shutdown":
            if streaming.groups and failed is None:
                sup.engine.abort_all()
            if ctx.reward_bridge is not None:
                ctx.reward_bridge.send_obj({"cmd": "shutdown"}, 1, "stopping the reward rank")
            streaming.flush()  # (read by RolloutClient._reply too)
            ch.send_obj(stats, 0, "acknowledging shutdown")
            return stats
        if failed is not None:
            if cmd == "sync":  # the stage owners send regardless: receive and drop
                for _ in bridge_receiver(ctx, msg["stages"])(lambda n: torch.empty(n, dtype=torch.uint8)):
                    pass
            if cmd != "admit":  # (an admit has no answer)
                ch.send_obj({"failed": failed}, 0, "reporting a failed engine")
            continue
        try:
            with streaming.answering_to(cmd):
                if cmd in _Streaming.COMMANDS or (cmd == "sync" and streaming.groups):
                    streaming.command(msg, stats)
                else:
                    _command(ctx, sup, msg, stats, reward_fn, handlers, streaming.notify)
        except EngineGaveUp as e:
            failed = str(e)
            log.error("%s", failed)
            if cmd != "admit":
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
        if msg.get("rows") is not None:
            reward_s = _score(ctx, reward_fn, samples, {msg["first_index"] + i: r for i, r in enumerate(msg["rows"])})
        stats["generate_calls"] += 1
        stats["samples"] += len(samples)
        ch.send_obj({"samples": samples, "seconds": time.perf_counter() - t0, "reward_s": reward_s}, 0,
                    "returning samples")
    elif cmd == "score":
        ch.send_obj({"logprobs": sup.call("scoring", lambda e: e.score(msg["sequences"]), notify)}, 0,
                    "returning scores")
    elif cmd == "sync":
        _acknowledge_sync(ctx, sup, sup.load_weights(bridge_receiver(ctx, msg["stages"]), msg["version"], notify),
                          stats)
    elif cmd in handlers:
        handlers[cmd](ctx, sup.engine, msg)
    else:
        raise ValueError(f"unknown rollout command {cmd!r}")


def _score(ctx: ClusterContext, reward_fn, samples: list, rows: dict) -> float:
    """Score ``samples`` here when rewards are computed on the rollout pool (``rows``: prompt index -> its row);
    returns the seconds it took (0 when the scorer is elsewhere)."""
    if reward_fn is None and ctx.reward_bridge is None:
        return 0.0
    from megatron_async_rlhf.rewards.placement import score_in_place, score_remotely

    if ctx.reward_bridge is not None:  # reward.placement=dedicated: this engine's reward rank scores
        return score_remotely(ctx.reward_bridge, samples, rows)
    return score_in_place(reward_fn, samples, rows)


def _acknowledge_sync(ctx: ClusterContext, sup: EngineSupervisor, load: dict, stats: dict) -> None:
    stats["syncs"] += 1
    stats["pid"], stats["worker_pids"] = os.getpid(), load.get("worker_pids", [])
    ctx.control.send_obj({**load, "version": sup.engine.version}, 0, "acknowledging a weight sync")


class _Streaming:
    """The streaming side of the server (``schedule=fully_async``). Commands:

    * ``admit`` ``{"groups": [{"id", "prompt", "index", "sampling", "row"}]}``: queue each group (``sampling.n``
      samples of ``prompt``; ``index`` is its samples' ``prompt_index`` and picks their seeds); no answer.
    * ``poll`` ``{"wait": bool, "until": [group ids]}``: answer the finished groups not yet returned, ``{"groups":
      [FinishedGroup], "in_flight", "busy_s", "up_s", "reward_s"}``; with ``wait`` only once at least one is there,
      or with ``until`` once none of those is in flight (either way, at once when nothing is in flight).
      ``busy_s``: seconds spent in engine steps since the first admit, ``up_s``: seconds since it.
    * ``sync`` while groups are in flight: the weights are loaded between two engine steps
      (``update_weights_between_steps`` with ``rollout.in_flight_kv``), then acknowledged as a plain sync is.

    A group is scored as it finishes when rewards are computed on the rollout pool (``reward.placement=rollout`` or
    ``dedicated``: the row travels with the group).

    Engine restarts (``supervisor.py``): an admit, an engine step or a weight load between steps whose engine dies
    (or hangs past ``rollout.hang_timeout_s``) restarts it with the newest weights it had loaded (or the ones it was
    loading), and :meth:`readmit` admits every group of ``groups`` again from its own prompt and seeds (admitted, not
    yet returned by an engine step: those finished on the dead engine but not collected included); the finished ones
    in ``ready`` are kept, so each group comes back exactly once. The restart events are sent at once when the
    controller waits for this engine's answer (a waiting poll, a sync), else before the next answer (an engine step
    between commands: the controller may be sending a command or weights, and is not reading)."""

    COMMANDS = ("admit", "poll")

    def __init__(self, ctx: ClusterContext, sup: EngineSupervisor, reward_fn, in_flight_kv: str,
                 notify: Callable[[dict], None]):
        self.ctx, self.sup, self.reward_fn, self.in_flight_kv = ctx, sup, reward_fn, in_flight_kv
        self._send_event = notify
        self.groups: dict[int, dict] = {}  # admitted, not finished: group id -> its admit ({id, prompt, index, ...})
        self.ready: list = []  # finished, not yet polled
        self.events: list[dict] = []  # restart events not sent yet (an engine step between commands)
        self.answering = False  # the controller waits for this engine's answer: events go at once
        sup.after_restart = self.readmit
        self.busy_s = self.reward_s = 0.0
        self.t0: float | None = None
        self.bell, self.heard = doorbell(ctx.session, ctx.role.engine), None  # commands counted since the first admit

    def received(self, cmd: str) -> None:
        if cmd == "admit" and self.heard is None:
            self.heard = 0
        if self.heard is not None:
            self.heard += 1

    def rung(self) -> bool:
        """A command is on its way (the controller rings before each send once it admitted groups)."""
        return self.ctx.store.add(self.bell, 0) > self.heard

    @contextlib.contextmanager
    def answering_to(self, cmd: str) -> Iterator[None]:
        """While command ``cmd`` is carried out. The controller reads the answers to ``poll``, ``generate``, ``score``
        and ``sync`` taking restart events first (``RolloutClient._reply``): the kept events are sent before them, and
        a restart's go at once (a sync's restart comes once its weights are received: till then the learner sends,
        it does not read, so the kept ones wait for a later answer). An admit has no answer; a mode's own commands
        read theirs as they are."""
        if cmd not in ("poll", "generate", "score", "sync"):
            yield
            return
        if cmd != "sync":
            self.flush()
        self.answering = True
        try:
            yield
        finally:
            self.answering = False

    def notify(self, event: dict) -> None:
        """A restart event (``supervisor``'s notify): sent now if the controller waits for an answer, else kept for
        the next answer."""
        self.events.append(event)
        if self.answering:
            self.flush()

    def flush(self) -> None:
        """Send the kept restart events (before an answer: the controller reads them first)."""
        events, self.events = self.events, []
        for event in events:
            self._send_event(event)

    @staticmethod
    def _admit_to(engine, groups) -> None:
        for g in groups:
            engine.admit(g["id"], g["prompt"], g["sampling"], prompt_index=g["index"])

    def readmit(self, engine) -> None:
        """After a restart (``sup.after_restart``): admit the groups in flight on the dead engine to the new one,
        with their own prompts and seeds."""
        self._admit_to(engine, self.groups.values())
        if self.groups:
            log.warning("rollout engine %d: %d streaming groups admitted again after the restart",
                        self.ctx.role.engine, len(self.groups))

    def step(self) -> None:
        """One engine step (restarted after a death: the groups in flight are then admitted again, none returned)."""
        if not self.sup.engine.in_flight():
            raise RuntimeError(f"rollout engine {self.ctx.role.engine} holds none of the {len(self.groups)} streaming "
                               "groups in flight: an engine was replaced without admitting them again")
        t = time.perf_counter()
        done = self.sup.streaming_call("generating (streaming)", "generating", lambda e: e.step(), self.notify)
        if done is None:  # restarted: the time went to recovery, not to generation
            return
        self.busy_s += time.perf_counter() - t
        for group in done:
            row = self.groups.pop(group.group_id).get("row")
            if row is not None:
                self.reward_s += _score(self.ctx, self.reward_fn, group.samples,
                                        {s.prompt_index: row for s in group.samples})
            self.ready.append(group)

    def command(self, msg: dict, stats: dict) -> None:
        cmd = msg["cmd"]
        if cmd == "admit":  # no answer: a restart's events wait for the next one
            if self.t0 is None:
                self.t0 = time.perf_counter()
            for g in msg["groups"]:
                if g["id"] in self.groups:
                    raise ValueError(f"group {g['id']} is already in flight on engine {self.ctx.role.engine}")
                self.groups[g["id"]] = g  # before the admit: a restart during it admits every group of `groups`
            self.sup.streaming_call("admitting groups", "admitting", lambda e: self._admit_to(e, msg["groups"]),
                                    self.notify)
        elif cmd == "poll":
            until = set(msg.get("until") or ())
            while msg.get("wait") and self.groups and (until & self.groups.keys() if until else not self.ready):
                self.step()
            ready, self.ready = self.ready, []
            stats["samples"] += sum(len(g.samples) for g in ready)
            self.ctx.control.send_obj({"groups": ready, "in_flight": len(self.groups), "busy_s": self.busy_s,
                                       "up_s": time.perf_counter() - (self.t0 or time.perf_counter()),
                                       "reward_s": self.reward_s}, 0, f"returning {len(ready)} finished groups")
        elif cmd == "sync":  # groups in flight: between two engine steps
            _acknowledge_sync(self.ctx, self.sup, self.sup.load_weights_between_steps(
                bridge_receiver(self.ctx, msg["stages"]), msg["version"], self.in_flight_kv, self.notify), stats)
        else:
            raise ValueError(f"unknown streaming command {cmd!r}")
