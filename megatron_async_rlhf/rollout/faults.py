"""Fault injection for drills and tests: ``MRLHF_FAULTS`` kills or stops a rollout engine at a chosen call.

``MRLHF_FAULTS="kill@generate#3"`` (comma-separated for several): ACTION@CALL#N, on engine ``MRLHF_FAULT_ENGINE``
(default 0), where CALL is ``generate`` or ``score`` (fires after the engine's first step of the N-th such request:
mid-generation; with ``schedule=fully_async`` every streaming engine step counts as a generation request too, so the
fault fires after that step, with groups in flight) or ``sync`` (fires when the N-th weight sync's first bucket has
arrived, while the rest are still on their way: mid-sync; a sync between streaming engine steps counts), and ACTION is

* ``kill``: SIGKILL the engine core (a crash: a GPU fallen off the bus, the OOM killer);
* ``stop``: SIGSTOP the engine core (a hang: it neither answers nor dies; ``rollout.hang_timeout_s`` ends it);
* ``kill-rank``: SIGKILL this rank itself (an engine that runs in its rank's process dies with it).

Each fault fires once. Unset (the normal case) this costs a dictionary lookup per call.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "MRLHF_FAULTS"
_CALLS = {"generate": "generating", "sync": "loading weights", "score": "scoring"}
_ACTIONS = ("kill", "stop", "kill-rank")
_pending_sync: list = []  # (supervisor, action) to fire at the next bucket
_fired: set[str] = set()


def parse(spec: str) -> list[tuple[str, str, int]]:
    """``"kill@generate#3,stop@sync#2"`` -> [(action, call, n)]; a ValueError naming the bad part."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            action, rest = part.split("@")
            call, n = rest.split("#")
            n = int(n)
        except ValueError:
            raise ValueError(f"{ENV}: {part!r} is not ACTION@CALL#N (e.g. kill@generate#3)") from None
        if action not in _ACTIONS or call not in _CALLS or n < 1:
            raise ValueError(f"{ENV}: {part!r}: ACTION is one of {list(_ACTIONS)}, CALL one of {list(_CALLS)}, N >= 1")
        out.append((action, _CALLS[call], n))
    return out


def arm(sup, what: str) -> None:
    """Called at the start of each watched call of engine supervisor ``sup``: fire a fault due at this call."""
    spec = os.environ.get(ENV)
    if not spec or int(os.environ.get("MRLHF_FAULT_ENGINE", "0")) != sup.index:
        return
    faults = parse(spec)
    for action, call, n in faults:
        key = f"{action}@{call}#{n}"
        if call != what or sup.calls.get(what) != n or key in _fired:
            continue
        _fired.add(key)
        if what == "loading weights":
            _pending_sync.append((sup, action))
        else:
            _after_first_step(sup, action)


def _after_first_step(sup, action: str) -> None:
    """Fire once the engine has taken the first step of the request (vLLM's ``LLMEngine.step``): mid-request."""
    engine = sup.engine.llm.llm_engine
    step = engine.step

    def first_step(*args, **kwargs):
        engine.step = step  # once
        out = step(*args, **kwargs)
        fire(sup, action)
        return out

    engine.step = first_step


def bucket_received(count: int) -> None:
    """Called as a weight stream's buckets arrive: a sync fault fires at the first."""
    if _pending_sync and count >= 1:
        fire(*_pending_sync.pop())


def fire(sup, action: str) -> None:
    if action == "kill-rank":
        log.error("fault injection (%s): killing this rank (pid %d)", ENV, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
    sup._look()
    core = [p for p in sup._tree if _cmdline(p).startswith("VLLM::EngineCore")]
    if not core:
        log.error("fault injection (%s): engine %d has no engine-core process (it runs in this rank: use kill-rank)",
                  ENV, sup.index)
        return
    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    log.error("fault injection (%s): %s of engine %d's core (pid %d)", ENV, signal.Signals(sig).name, sup.index,
              core[0])
    os.kill(core[0], sig)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""
