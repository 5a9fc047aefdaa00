"""Engines come back: a rollout engine that dies or hangs is restarted in its rank and the call is repeated.

At cluster scale engines die (a GPU falls off the bus, an OOM in a long generation). vLLM's engine core and its
workers run in processes of their own (the GPU default; ``rollout.vllm.engine_multiprocess=true`` on CPU), so they can
die while the rank that hosts them, and its bridges to the learner, live on. This rank's supervisor:

* watches every engine call (a generation request, a scoring request, a weight load). vLLM notices a dead engine
  core but leaves a blocked call waiting forever (0.32's synchronous client); the supervisor ends that wait with
  ``EngineDeadError``. A call still running after ``rollout.hang_timeout_s`` is a hang: the engine's processes are
  killed (SIGKILL), which makes it a death;
* on a death restarts the engine: what is left of the old one is killed and its shared memory removed, a new engine
  starts and loads the weights the dead one held (the last complete weight stream, kept in this rank's memory while
  ``rollout.max_restarts > 0``: one copy of the model in host RAM per engine), and the call is repeated. A generation
  request is repeated with its own prompts and seeds, so its samples are the ones the dead engine would have returned:
  the schedule's invariants (staleness, each prompt trained once) hold as if nothing happened. A weight sync that
  the death interrupted is received to its end (the learner's side never notices) and loaded into the new engine;
* gives up after ``rollout.max_restarts`` restarts of this engine: the call raises :class:`EngineGaveUp`, which the
  controller turns into a checkpoint and a non-zero exit naming the engine.

Each restart is told to the controller before the repeated call's answer (``notify``) and logged in
``metrics.jsonl``. An engine that runs inside its rank's own process (vLLM in-process, the CPU default) dies with the
rank: that cannot be restarted here; the run stops naming the engine and ``resume=auto`` continues it.

The streaming calls of ``schedule=fully_async`` (``server._Streaming``: admits, engine steps, weight loads between
them) are watched the same way, but not repeated: the groups in flight die with the engine, so after the new engine
has loaded the weights, ``after_restart`` (the streaming side's) admits them again from their own prompts and seeds,
and the loop goes on stepping. Their tokens then come from the restarted engine's version, which is at least the one
they were admitted under (weights only move forward): the staleness bound holds. A restart by any call, a generation
request beside the streaming groups included, re-admits them.

Drills: ``MRLHF_FAULTS`` (``rollout/faults.py``) kills or stops this engine's processes at a chosen call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable, Iterator

import torch

from megatron_async_rlhf.cluster import RolloutError
from megatron_async_rlhf.rollout import faults
from megatron_async_rlhf.rollout.reaper import _alive, descendants, mapped_shm

log = logging.getLogger(__name__)

_POLL_S = 0.25
_VLLM_SHM = ("vllm_", "psm_")  # vLLM's message queues between its processes (Python shared_memory: psm_)


class EngineGaveUp(RolloutError):
    """An engine failed again after ``rollout.max_restarts`` restarts (or could not be restarted)."""


def _dead_error(message: str) -> Exception:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError

        return EngineDeadError(message)
    except ImportError:  # a backend without vLLM
        return RuntimeError(message)


class EngineSupervisor:
    """Rank-local owner of engine ``index``: ``start()`` builds it (``rollout/server.get_engine``), ``stop()`` closes
    it (``rollout/server.close_engines``)."""

    def __init__(self, start: Callable, stop: Callable, index: int, max_restarts: int, hang_timeout_s: float | None):
        self._start, self._stop = start, stop
        self.index, self.max_restarts, self.hang_timeout_s = index, max_restarts, hang_timeout_s
        self.restarts = 0
        self.calls: dict[str, int] = {}
        self._weights: list[tuple] | None = None  # the last complete weight stream: (header, bytes) per bucket
        self.engine = start()
        self.version = self.engine.version = 0
        self._tree: dict[int, int] = {}  # the engine's processes (pid -> start time), seen at the last call
        # called with the new engine once it holds the weights, before the restart is reported (the streaming groups
        # in flight are admitted again there)
        self.after_restart: Callable[[object], None] | None = None
        self._shm: set[str] = set()  # the shared-memory files they mapped

    # ----- the engine's processes ---------------------------------------------------------------------------------
    def _look(self) -> None:
        """Remember the engine's processes and their shared memory (after a death they are no longer below us)."""
        tree = {p: s for p, s in descendants(os.getpid(), -1).items() if _is_vllm(p)}
        if tree and tree != self._tree:
            self._shm |= {p for p in mapped_shm(tree) if os.path.basename(p).startswith(_VLLM_SHM)}
        self._tree = tree or self._tree

    def _signal(self, sig: int) -> list[int]:
        pids = _alive(self._tree)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def _core(self):
        """vLLM's client of its engine core when that runs in its own process (else None)."""
        core = getattr(getattr(getattr(self.engine, "llm", None), "llm_engine", None), "engine_core", None)
        return core if hasattr(core, "resources") else None

    def _look_if_new(self) -> None:
        """:meth:`_look` once per engine whose core is a process of its own (a streaming call, once per engine step,
        cannot afford a scan of /proc each time; the processes of an engine do not change while it lives)."""
        if not self._tree and self._core() is not None:
            self._look()

    def _engine_dead(self) -> bool:
        core = self._core()
        return bool(core is not None and core.resources.engine_dead)

    def _unblock(self, why: str) -> None:
        """End the wait of a call blocked on a dead engine core (outputs or a utility call's future)."""
        core = self._core()
        if core is None:
            return
        err = _dead_error(why)
        q = getattr(core, "outputs_queue", None)
        if q is not None:
            q.put_nowait(err)
        for fut in list(getattr(core, "utility_results", {}).values()):
            with contextlib.suppress(Exception):
                if not fut.done():
                    fut.set_exception(err)

    @contextlib.contextmanager
    def _watched(self, what: str, kind: str | None = None, look: bool = True) -> Iterator[dict]:
        """Run a call under watch: a dead engine core ends its wait; past ``hang_timeout_s`` the engine is killed.
        ``kind``: the call as ``MRLHF_FAULTS`` counts it (default ``what``); ``look=False`` (a streaming call, once per
        engine step): the engine's processes are looked up only once per engine (:meth:`_look_if_new`), and an
        engine without processes of its own is not watched."""
        self._look() if look else self._look_if_new()
        state = {"hung": False, "dead": False}
        stop = threading.Event()
        t0 = time.monotonic()

        def watch():
            while not stop.wait(_POLL_S):
                if self._engine_dead():
                    state["dead"] = True
                    self._unblock(f"rollout engine {self.index}'s engine core died while {what}")
                    return
                if self.hang_timeout_s and not state["hung"] and time.monotonic() - t0 > self.hang_timeout_s:
                    state["hung"] = True
                    killed = self._signal(signal.SIGKILL)
                    log.error("rollout engine %d: %s for %.0f s (rollout.hang_timeout_s): %s", self.index, what,
                              time.monotonic() - t0,
                              f"killed its processes {killed}" if killed else
                              "it runs in this rank's process and cannot be interrupted")

        faults.arm(self, kind or what)
        if not look and self._core() is None and not self._tree:
            # an in-process engine core and no process of its own: no death to see, nothing to kill on a hang (it
            # dies with this rank); a thread per streaming engine step would cost for nothing
            yield state
            return
        watcher = threading.Thread(target=watch, name=f"engine{self.index}-watch", daemon=True)
        watcher.start()
        try:
            yield state
        finally:
            stop.set()
            watcher.join()

    def _failure(self, e: BaseException, state: dict) -> str | None:
        """Why ``e`` means the engine is gone (a restart can help), or None (a real error: raise it)."""
        if state["hung"]:
            return f"hung past rollout.hang_timeout_s={self.hang_timeout_s:g} s"
        if state["dead"] or self._engine_dead() or type(e).__name__ == "EngineDeadError":
            return "its engine core died"
        if isinstance(e, torch.OutOfMemoryError):
            return f"out of memory ({str(e).splitlines()[0] if str(e) else ''})"
        return None

    # ----- restarts ------------------------------------------------------------------------------------------------
    def _restart(self, what: str, reason: str, notify: Callable[[dict], None]) -> dict:
        """Kill what is left, start a new engine with the weights the dead one held; returns that load's stats."""
        self._bury()
        if self.restarts >= self.max_restarts:
            raise EngineGaveUp(f"rollout engine {self.index} failed while {what}: {reason}; restarted "
                               f"{self.restarts} time(s) already (rollout.max_restarts={self.max_restarts})")
        self.restarts += 1
        t0 = time.monotonic()
        notify({"event": "engine_restarting", "engine": self.index, "while": what, "reason": reason})
        log.error("rollout engine %d failed while %s: %s; restarting it (%d of rollout.max_restarts=%d)", self.index,
                  what, reason, self.restarts, self.max_restarts)
        self.engine = self._start()
        loaded = {}
        if self._weights is not None:  # the weights the dead engine held
            loaded = self.engine.load_weight_stream(self._replay, self.version)
        self.engine.version = self.version
        if self.after_restart is not None:
            self.after_restart(self.engine)
        event = {"event": "engine_restart", "engine": self.index, "restart": self.restarts, "while": what,
                 "reason": reason, "version": self.version, "recover_s": round(time.monotonic() - t0, 3)}
        log.warning("rollout engine %d restarted in %.1f s with weights v%d", self.index, event["recover_s"],
                    self.version)
        notify(event)
        return loaded

    def _bury(self) -> None:
        """Kill what is left of a dead engine, close it, remove the shared memory its processes mapped."""
        self._signal(signal.SIGKILL)
        try:
            self._stop()
        except Exception as e:  # noqa: BLE001 - a dead engine's goodbye may fail; the new one matters
            log.warning("closing the dead engine %d: %s", self.index, e)
        deadline = time.monotonic() + 10
        while _alive(self._tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        for path in self._shm - mapped_shm([os.getpid()]):  # its message queues, unless this process still maps one
            with contextlib.suppress(OSError):
                os.unlink(path)
            if os.path.basename(path).startswith("psm_"):  # this process's tracker would remove it again at exit
                with contextlib.suppress(Exception):
                    from multiprocessing import resource_tracker

                    resource_tracker.unregister("/" + os.path.basename(path), "shared_memory")
        self._tree, self._shm = {}, set()

    def _replay(self, alloc) -> Iterator[tuple]:
        for header, kept in self._weights:
            buf = alloc(kept.numel())
            buf.copy_(kept)
            yield header, buf

    def call(self, what: str, fn: Callable, notify: Callable[[dict], None], kind: str | None = None,
             repeat: bool = True):
        """``fn(engine)``, repeated on a restarted engine after a death (bounded). ``kind``: the call as
        ``MRLHF_FAULTS`` counts it (default ``what``). ``repeat=False``, a streaming call (an admit, an engine step):
        after the restart None is returned and ``fn`` is not repeated; ``after_restart`` admitted the groups in flight
        again and they carry its work on."""
        kind = kind or what
        self.calls[kind] = self.calls.get(kind, 0) + 1
        while True:
            with self._watched(what, kind, look=repeat) as state:
                try:
                    return fn(self.engine)
                except Exception as e:
                    reason = self._failure(e, state)
                    if reason is None:
                        raise
            self._restart(what, reason, notify)
            if not repeat:
                return None

    def streaming_call(self, what: str, kind: str, fn: Callable, notify: Callable[[dict], None]):
        """:meth:`call` for a streaming call: not repeated, None after a restart."""
        return self.call(what, fn, notify, kind=kind, repeat=False)

    def load_weights(self, receive, version: int, notify: Callable[[dict], None]) -> dict:
        """Load a weight stream (``RolloutBackend.load_weight_stream``), keeping a copy for a restart. A death while
        loading: the rest of the stream is still received (the stage owners keep sending), the engine restarts and
        loads the copy."""
        return self._load("loading weights", lambda stream: self.engine.load_weight_stream(stream, version), receive,
                          version, notify)

    def load_weights_between_steps(self, receive, version: int, in_flight_kv: str,
                                   notify: Callable[[dict], None]) -> dict:
        """A weight stream loaded while streaming groups are in flight (``RolloutBackend.
        update_weights_between_steps``), kept and restarted as :meth:`load_weights` does: after a death the new
        engine loads this version and ``after_restart`` admits the groups in flight again (their tokens so far are
        lost with the engine; all of their tokens are then sampled by this version)."""
        out = self._load("loading weights between engine steps",
                         lambda stream: self.engine.update_weights_between_steps(stream, version, in_flight_kv),
                         receive, version, notify)
        return {**out, "in_flight": self.engine.in_flight(), "in_flight_kv": in_flight_kv}

    def _load(self, what: str, load: Callable, receive, version: int, notify: Callable[[dict], None]) -> dict:
        """``load(stream)`` of the weight stream ``receive`` as ``version``, the copy kept; a restart after a death.
        Every kind of load counts as a weight sync for ``MRLHF_FAULTS``."""
        kind = "loading weights"
        self.calls[kind] = self.calls.get(kind, 0) + 1
        stream = _KeptStream(receive, keep=self.max_restarts > 0)
        with self._watched(what, kind) as state:
            try:
                out = load(stream)
                failed = None
            except Exception as e:
                failed = self._failure(e, state)
                if failed is None:
                    raise
        if failed is None:
            self.version = version
            self._weights = stream.kept if stream.keep else None
            return out
        stream.drain()
        self.version, self._weights = version, stream.kept
        return self._restart(what, failed, notify)


class _KeptStream:
    """``receive(alloc)`` wrapped: every bucket is copied as it arrives (when ``keep``), and after a failed load the
    rest can be received into plain memory (``drain``). Safe against the loader's prefetch thread: one ``next`` at a
    time."""

    def __init__(self, receive, keep: bool):
        self.receive, self.keep = receive, keep
        self.kept: list[tuple] = []
        self.received = 0
        self._alloc = None
        self._it = None
        self._lock = threading.Lock()

    def __call__(self, alloc):
        self._alloc = alloc
        self._it = self.receive(lambda n: self._alloc(n))
        return self

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            header, flat = next(self._it)
            if self.keep:
                self.kept.append((header, flat.clone()))
            self.received += 1
            faults.bucket_received(self.received)
            return header, flat

    def drain(self) -> None:
        self.keep = True  # a restart loads the copy
        self._alloc = lambda n: torch.empty(n, dtype=torch.uint8)
        if self._it is None:
            self._it = self.receive(self._alloc)
        with self._lock:  # waits for a prefetch in progress
            for header, flat in self._it:
                self.kept.append((header, flat.clone()))


def _is_vllm(pid: int) -> bool:
    """vLLM names its processes ``VLLM::EngineCore``, ``VLLM::Worker...``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(6) == b"VLLM::"
    except OSError:
        return False
