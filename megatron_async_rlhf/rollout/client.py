"""The learner's side of the rollout pool: generation requests, weight syncs, shutdown.

Only the controller (learner rank 0) talks to the engines; every learner rank takes part in a weight sync (TP ranks
gather, each stage's owner broadcasts its stage). A request can be left in flight while the learner trains
(``submit_generate`` / ``collect``): that is the asynchronous schedule's overlap. ``schedule=fully_async`` streams
instead: ``admit`` prompt groups, ``poll`` for the finished ones, and ``sync_weights`` while they are generated (the
engines load between two decoding steps); see ``rollout/server.py``.

An engine that died and was restarted (``supervisor.py``) says so before its answer: the events are kept in
``events`` (the loop logs them in metrics.jsonl). One that cannot go on answers ``failed``: the call raises
``EngineGaveUp`` naming it, on every learner rank of a weight sync, after the other engines answered.
"""

from __future__ import annotations

import logging
import time

import torch.distributed as dist

from megatron_async_rlhf.cluster import ClusterContext, RolloutError
from megatron_async_rlhf.rollout.base import Sample, SamplingSettings
from megatron_async_rlhf.rollout.supervisor import EngineGaveUp
from megatron_async_rlhf.weights.gather import stage_hf_groups
from megatron_async_rlhf.weights.sync import PackBuffers, dtype_from_name, send_stage, wire_dtype

log = logging.getLogger(__name__)


def doorbell(session: str, engine: int) -> str:
    """The store key counting the commands sent to ``engine`` since it started streaming (see
    :meth:`RolloutClient.command`)."""
    return f"{session}/doorbell{engine}"


class RolloutClient:
    def __init__(self, ctx: ClusterContext):
        self.ctx = ctx
        self.engines = ctx.cfg.rollout_engines
        self._pending: list[tuple[int, int]] | None = None  # (engine group rank, number of prompts) in flight
        self.last_sync: dict = {}
        self.last_collect: dict = {}  # reward_s (longest engine's scoring), collect_wait_s of the last collect()
        self._pack_buffers = PackBuffers()  # a stage owner's two reusable send buffers
        self.events: list[dict] = []  # engine restarts since the loop last took them (controller only)
        self._streaming = False  # groups were admitted (schedule=fully_async): commands ring a doorbell first
        box = [None]
        if ctx.is_controller:  # engines report once they are up; nothing is timed before that
            ready = [ctx.control.recv_obj(e + 1, "starting up (loading the model)", timeout_s=ctx.cfg.startup_timeout_s)
                     for e in range(self.engines)]
            dtypes = {r.get("dtype") for r in ready}
            if len(dtypes) > 1:
                raise RolloutError(f"rollout engines hold weights in different dtypes: {sorted(map(str, dtypes))}")
            box = [dtypes.pop() if dtypes else None]
        # the whole learner pool starts once the rollout pool is up, knowing the engines' weight dtype
        dist.broadcast_object_list(box, src=0)
        self.engine_dtype = dtype_from_name(box[0])  # syncs are staged in it (weights.sync.wire_dtype)

    def command(self, engine: int, msg: dict, what: str) -> None:
        """Send a command to ``engine`` (0-based). Once groups were admitted (streaming) the engine steps between
        commands and reads one only when its doorbell rings (a counter in the store, which it can check without
        blocking: a posted gloo receive cannot be polled), so every command rings it first."""
        if self._streaming:
            self.ctx.store.add(doorbell(self.ctx.session, engine), 1)
        self.ctx.control.send_obj(msg, engine + 1, what)

    # ----- generation (controller only) ------------------------------------------------------------------------
    def submit_generate(self, prompts: list[list[int]], sampling: SamplingSettings, rows: list | None = None) -> None:
        """Send the prompts, split evenly over the engines, without waiting for the samples. ``rows`` (one per
        prompt: text, gold answer) travel with them when the engines score what they generate
        (``reward.placement=rollout``)."""
        assert self.ctx.is_controller, "only learner rank 0 talks to the engines"
        if self._pending is not None:
            raise RuntimeError("a generation request is already in flight; collect() it first")
        self._pending = []
        per = -(-len(prompts) // self.engines)
        for e in range(self.engines):
            chunk = prompts[e * per:(e + 1) * per]
            if not chunk:
                continue
            self.command(e, {"cmd": "generate", "prompts": chunk, "sampling": sampling, "first_index": e * per,
                             "rows": rows[e * per:(e + 1) * per] if rows is not None else None},
                         f"sending {len(chunk)} prompts")
            self._pending.append((e + 1, len(chunk)))

    def _reply(self, peer: int, what: str):
        """Engine ``peer``'s answer to a command, after the restart events it sends first (kept in ``events``). While
        it restarts the wait is its start-up's (``cluster.startup_timeout_s``) plus a call's."""
        cl = self.ctx.cfg
        timeout = None
        while True:
            msg = self.ctx.control.recv_obj(peer, what, timeout_s=timeout)
            if not (isinstance(msg, dict) and ("event" in msg or "failed" in msg)):
                return msg
            if "failed" in msg:
                raise EngineGaveUp(msg["failed"])
            if msg["event"] == "engine_restarting":
                log.warning("rollout engine %d failed while %s (%s): restarting", msg["engine"], msg["while"],
                            msg["reason"])
                timeout = cl.startup_timeout_s + cl.timeout_s
            else:
                log.warning("rollout engine %d restarted in %.1f s; %s again", msg["engine"], msg["recover_s"],
                            msg["while"])
                self.events.append(msg)
                timeout = None

    def _replies(self, peers: list[tuple[int, str]]) -> list:
        """Every engine's answer; an engine that failed for good raises ``EngineGaveUp`` once the others answered."""
        out, failed = [], None
        for peer, what in peers:
            try:
                out.append(self._reply(peer, what))
            except EngineGaveUp as e:
                failed = failed or e
        if failed is not None:
            raise failed
        return out

    def take_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def collect(self) -> list[Sample]:
        """Wait (up to cluster.timeout_s per engine) for the samples of the request in flight."""
        assert self._pending is not None, "no generation request in flight"
        out: list[Sample] = []
        pending, self._pending = self._pending, None
        t0, reward_s = time.perf_counter(), 0.0
        for reply in self._replies([(peer, f"generating {n} prompts") for peer, n in pending]):
            out += reply["samples"]
            reward_s = max(reward_s, reply.get("reward_s", 0.0))
        # scoring is the tail of each engine's request: the learner waited for at most the part of it that outlasted
        # its own work
        self.last_collect = {"reward_s": reward_s, "collect_wait_s": time.perf_counter() - t0}
        return out

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, rows: list | None = None) -> list[Sample]:
        self.submit_generate(prompts, sampling, rows)
        return self.collect()

    def score(self, sequences: list[list[int]], engine: int = 0) -> list[list[float]]:
        """The engine's log-probs of given sequences (tokens 1..L-1) under its current weights."""
        self.command(engine, {"cmd": "score", "sequences": sequences}, "sending sequences to score")
        return self._replies([(engine + 1, f"scoring {len(sequences)} sequences")])[0]["logprobs"]

    # ----- streaming (controller only; schedule=fully_async): rollout/server.py's _Streaming ------------------------
    def admit(self, engine: int, groups: list[dict]) -> None:
        """Queue prompt groups on ``engine`` (0-based), each ``{"id", "prompt", "index", "sampling", "row"}``; the
        engine generates them between commands, weight syncs included, until they are polled."""
        assert self.ctx.is_controller, "only learner rank 0 talks to the engines"
        self._streaming = True  # from now on every command rings the engines' doorbells
        self.command(engine, {"cmd": "admit", "groups": groups}, f"admitting {len(groups)} groups")

    def poll(self, engine: int, wait: bool = False, until: list[int] | None = None) -> dict:
        """``engine``'s finished groups not returned yet (``{"groups": [FinishedGroup], "in_flight", "busy_s",
        "up_s", "reward_s"}``); ``wait``: only once at least one has finished, or, with ``until`` (group ids), once
        every one of those has (or nothing is in flight): one round trip for what a step waits for."""
        assert self.ctx.is_controller, "only learner rank 0 talks to the engines"
        self.command(engine, {"cmd": "poll", "wait": wait, "until": list(until or ())}, "polling finished groups")
        return self._replies([(engine + 1, "generating prompt groups")])[0]

    # ----- weights (every learner rank) ------------------------------------------------------------------------
    def sync_weights(self, model, info, cfg, version: int) -> dict:
        """Push the learner's current weights to every engine as ``version``. Collective over the learner pool; a
        failed engine raises on every learner rank."""
        if self._pending is not None:
            raise RuntimeError("weights cannot change while a generation request is in flight; collect() first")
        t0 = time.perf_counter()
        failure = None  # this rank's: an engine that failed for good, or a dead engine rank
        try:
            self._push(model, info, cfg, version)
        except RolloutError as e:
            failure = e
        stats = {}
        if self.ctx.is_controller and failure is None:
            try:
                acks = self._replies([(e + 1, f"loading weights v{version}") for e in range(self.engines)])
                bad = [a["version"] for a in acks if a["version"] != version]
                if bad:
                    raise RolloutError(f"engines report versions {bad} after syncing v{version}")
                stats = self._sync_stats(acks, time.perf_counter() - t0, version)
            except RolloutError as e:
                failure = e
        # the whole learner pool leaves the sync together, and fails together (a checkpoint needs every rank)
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        first = failure or next((f for f in failures if f is not None), None)
        if first is not None:
            raise first
        self.last_sync = stats
        return stats

    def _push(self, model, info, cfg, version: int) -> None:
        """Tell the engines, then every stage owner sends its stage (TP ranks take part in the gathers)."""
        from megatron.core import parallel_state as ps

        if self.ctx.is_controller:
            for e in range(self.engines):
                self.command(e, {"cmd": "sync", "version": version, "stages": info.pp},
                             f"starting weight sync v{version}")
        if ps.get_data_parallel_rank() == 0:
            bucket = int(self.ctx.cfg.bucket_mb * 2**20)
            dtype = wire_dtype(next(model.parameters()).dtype, self.engine_dtype)  # converted before it leaves
            named = stage_hf_groups(model, info, cfg, dtype, chunk_bytes=bucket)  # collective over the stage's TP group
            if info.tp_rank == 0:
                if info.pp_rank not in self.ctx.bridges:
                    raise RuntimeError(f"learner rank {dist.get_rank()} owns stage {info.pp_rank}'s weights but is not "
                                       "on its bridge: megatron-core's rank order differs from cluster.weight_owners")
                send_stage(self.ctx.bridges[info.pp_rank], named, bucket,
                           f"receiving weights v{version} of stage {info.pp_rank}", self._pack_buffers)
            else:
                for _ in named:  # take part in the TP gathers; the stage owner sends
                    pass

    def _sync_stats(self, acks: list[dict], secs: float, version: int) -> dict:
        nbytes = acks[0]["bytes"]
        stats = {"sync_seconds": secs, "sync_bytes": nbytes, "sync_gbps": nbytes / secs / 1e9,
                 "engine_load_s": max(a["load_s"] for a in acks), "tensors": acks[0]["tensors"],
                 "engine_peak_extra_bytes": max(a["peak_extra_bytes"] for a in acks),
                 "max_bucket_bytes": max(a["max_bucket_bytes"] for a in acks), "buckets": acks[0]["buckets"]}
        if any("in_flight" in a for a in acks):  # streaming (schedule=fully_async): groups the new weights continue
            stats["sync_in_flight_groups"] = sum(a.get("in_flight", 0) for a in acks)
        log.info("weight sync v%d: %.3f s, %.2f MB to %d engine(s), %.3f GB/s effective (engine load %.3f s, peak "
                 "extra engine memory %.1f MB)", version, secs, nbytes / 1e6, self.engines, stats["sync_gbps"],
                 stats["engine_load_s"], stats["engine_peak_extra_bytes"] / 1e6)
        return stats

    def shutdown(self) -> list[dict]:
        """Stop the engines (a request still in flight is drained first: an engine busy sending its samples would
        never read the shutdown)."""
        if not self.ctx.is_controller:
            return []
        if self._pending is not None:
            try:
                self.collect()
            except EngineGaveUp as e:  # the others answered; the failed one still takes the shutdown
                log.warning("dropping the request in flight: %s", e)
        out, errors = [], []
        try:
            for e in range(self.engines):
                try:
                    self.command(e, {"cmd": "shutdown"}, "asking to shut down")
                    out.append(self._reply(e + 1, "shutting down"))
                except RolloutError as err:  # a dead engine rank: stop the others all the same
                    errors.append(err)
        finally:
            self.ctx.store.set(f"{self.ctx.session}/shutdown", "1")
        if errors:
            raise errors[0]
        return out
