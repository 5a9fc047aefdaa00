"""A multi-process engine's processes and shared memory do not outlive its rank.

vLLM's engine core (and through it the TP workers) stays alive when the process that created it is killed (kill -9,
the OOM killer): nothing tells it, and its workers keep their ``/dev/shm/vllm_dist_*`` files. The rank that hosts a
multi-process engine therefore starts this script beside it. It watches the rank's descendants (pid and start time,
and the ``/dev/shm`` files they map); when the rank is gone it stops them (SIGTERM: vLLM's own orderly shutdown; SIGKILL
after a grace), removes the files they mapped and the rank's weight-stream buckets (``mrlhf-<run>-<pid>-*``, their lock
now free). ``VLLMBackend.close`` stops it after a normal shutdown.

Runs as a plain script (``python reaper.py RANK_PID RUN_ID``): standard library only, so it starts in milliseconds.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time

SHM = "/dev/shm"
POLL_S = 1.0
TERM_GRACE_S = 30.0


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a live process, else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int, exclude: int) -> dict[int, int]:
    """pid -> start time of every process below ``root`` (this script excluded)."""
    children: dict[int, list[int]] = {}
    start: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append(int(name))
                start[int(name)] = st[2]
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c != exclude and c not in out:
                out[c] = start[c]
                todo.append(c)
    return out


def mapped_shm(pids) -> set[str]:
    paths = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(SHM + "/")
                    if i >= 0:
                        paths.add(line[i:].strip().removesuffix(" (deleted)"))
        except OSError:
            pass
    return paths


def _alive(tree: dict[int, int]) -> list[int]:
    out = []
    for pid, start in tree.items():
        st = _stat(pid)
        if st is not None and st[0] != "Z" and st[2] == start:  # the same process, not a reused pid
            out.append(pid)
    return out


def reap(leader: int, run: str, tree: dict[int, int], paths: set[str]) -> None:
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        for pid in _alive(tree):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
    prefix = f"mrlhf-{run}-{leader}"
    lock = os.path.join(SHM, prefix + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: its owner is gone
        paths |= {os.path.join(SHM, n) for n in os.listdir(SHM) if n.startswith(prefix + "-")} | {lock}
    except OSError:
        pass  # no buckets made, or the lock is held (not ours to remove)
    for p in sorted(paths, key=lambda p: p.endswith(".lock")):
        try:
            os.unlink(p)
        except OSError:
            pass


def main(leader: int, run: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the rank; this one cleans up after it
    me = os.getpid()
    tree: dict[int, int] = {}
    paths: set[str] = set()
    polls = 0
    while os.getppid() == leader:
        now = descendants(leader, me)
        # maps are long on GPU machines: read each poll while the engine starts, then when something changed, else 1 in 10
        if now and (polls < 60 or now != tree or polls % 10 == 0):
            paths |= mapped_shm(now)
        tree = now or tree
        polls += 1
        time.sleep(POLL_S)
    reap(leader, run, tree, {p for p in paths if os.path.basename(p).startswith(("vllm_", "mrlhf-"))})


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
