"""Roles in one torchrun launch: the learner pool, the rollout pool, and the bridge between them.

- No default group spans the whole world. Learner ranks form their own default group (Megatron's ``parallel_state``
  sees only them); each engine leader gets a 1-rank default group that vLLM accepts as its own.
- Bridges: one standalone process group per learner pipeline stage, joining that stage's weight owner (its TP rank 0
  of DP replica 0, which holds the gathered full tensors) with every engine leader. Stage 0's owner is also the
  learner's controller (global rank 0): commands and samples travel on bridge 0.
- Everything is built from the launcher's TCP store (torchrun's, at MASTER_ADDR:MASTER_PORT) with per-purpose
  prefixes; every group has an explicit timeout. gloo on CPU, NCCL on GPU for the weight buffers.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # annotations only: the config layer sits above this one
    from megatron_async_rlhf.config import ClusterConfig

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The rollout pool did not answer: an engine died, hung past the timeout, or failed."""


def shared_failure(err: Exception | None) -> Exception | None:
    """The controller's (learner rank 0's) failure, or None, on every rank of the learner pool: a collective, so the
    pool can write a checkpoint together before it stops."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return err
    box = [err if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass(frozen=True)
class Role:
    rank: int
    kind: str  # "learner" | "engine" (an engine's leader rank) | "idle" (an engine's other ranks: vLLM's workers)
    #            | "reward" (reward.placement=dedicated: the scorer of engine ``engine``)
    learner_rank: int | None = None
    engine: int | None = None


def role_of(rank: int, cfg: ClusterConfig) -> Role:
    if rank < cfg.learner_world:
        return Role(rank, "learner", learner_rank=rank)
    r = rank - cfg.learner_world
    if r >= cfg.rollout_world:
        return Role(rank, "reward", engine=r - cfg.rollout_world)
    return Role(rank, "engine" if r % cfg.rollout_tp == 0 else "idle", engine=r // cfg.rollout_tp)


def weight_owners(cfg: ClusterConfig) -> list[int]:
    """Global rank of (tp 0, dp 0) in each pipeline stage, in megatron-core's default rank order (tp fastest, then dp,
    pp slowest). RolloutClient.sync_weights fails loudly if megatron-core's order ever differs."""
    return [s * cfg.learner_tp * cfg.learner_dp for s in range(cfg.learner_pp)]


def reward_rank(cfg: ClusterConfig, engine: int) -> int:
    return cfg.learner_world + cfg.rollout_world + engine


def engine_leaders(cfg: ClusterConfig) -> list[int]:
    return [cfg.learner_world + e * cfg.rollout_tp for e in range(cfg.rollout_engines)]


def connect_store(timeout_s: float) -> dist.Store:
    """A client of the launcher's store (torchrun serves it at MASTER_ADDR:MASTER_PORT)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def wait_for_key(store: dist.Store, key: str, poll_s: float = 1.0) -> None:
    """Block until ``key`` is set, however long that takes (an idle rank waits out the whole run). ``store.wait``
    would give up after the store's timeout (``cluster.timeout_s``, meant for one call), so this polls ``check``,
    which returns at once; a store that is gone (the launcher died) still raises."""
    while not store.check([key]):
        time.sleep(poll_s)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _new_group(store, rank: int, size: int, timeout_s: float):
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


class Channel:
    """Messages and tensors between members of one bridge group, with timeouts and errors that name the peer."""

    def __init__(self, pg, members: list[int], names: dict[int, str], timeout_s: float):
        self.pg, self.members, self.names, self.timeout_s = pg, members, names, timeout_s
        self.rank = pg.rank()

    def _name(self, group_rank: int) -> str:
        return self.names.get(self.members[group_rank], f"rank {self.members[group_rank]}")

    def _run(self, start, peer: int, what: str, timeout_s: float | None) -> None:
        """Start an operation (``start()`` returns its Work) and wait for it; any failure becomes a RolloutError that
        names the peer and what it was doing."""
        t = timeout_s or self.timeout_s
        try:
            ok = start().wait(datetime.timedelta(seconds=t))
        except Exception as e:  # gloo: connection closed by a dead peer, a pair closed by an earlier timeout, ...
            first = str(e).splitlines()[0] if str(e) else ""
            raise RolloutError(f"{self._name(peer)} did not answer while {what}: {type(e).__name__}: {first} "
                               f"(timeout {t:.0f} s)") from e
        if ok is False:
            raise RolloutError(f"{self._name(peer)} did not answer within {t:.0f} s while {what}")

    def send_obj(self, obj, dst: int, what: str, timeout_s: float | None = None) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        header = torch.tensor([payload.numel()], dtype=torch.int64)
        self._run(lambda: self.pg.send([header], dst, 0), dst, what, timeout_s)
        self._run(lambda: self.pg.send([payload], dst, 1), dst, what, timeout_s)

    def recv_obj(self, src: int, what: str, timeout_s: float | None = None):
        header = torch.empty(1, dtype=torch.int64)
        self._run(lambda: self.pg.recv([header], src, 0), src, what, timeout_s)
        payload = torch.empty(int(header.item()), dtype=torch.uint8)
        self._run(lambda: self.pg.recv([payload], src, 1), src, what, timeout_s)
        return pickle.loads(payload.numpy().tobytes())

    def broadcast(self, t: torch.Tensor, root: int, what: str, timeout_s: float | None = None, wait: bool = True):
        """Broadcast ``t`` (moved to the bridge's device) from group rank ``root``; returns the received tensor.
        ``wait=False`` only starts it (the backend's thread moves the bytes) and returns a function that waits for it
        and then returns the tensor."""
        dev = _device()
        buf = t if t.device == dev else t.to(dev)
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        peer = root if self.rank != root else (1 if len(self.members) > 1 else 0)
        if not wait:
            work = self.pg.broadcast([buf], opts)

            def finish() -> torch.Tensor:
                self._run(lambda: work, peer, what, timeout_s)
                return buf

            return finish
        self._run(lambda: self.pg.broadcast([buf], opts), peer, what, timeout_s)
        return buf

    def broadcast_obj(self, obj, root: int, what: str):
        if self.rank == root:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            n = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            payload, n = None, torch.empty(1, dtype=torch.int64)
        n = self.broadcast(n, root, what).cpu()
        if payload is None:
            payload = torch.empty(int(n.item()), dtype=torch.uint8)
        payload = self.broadcast(payload, root, what).cpu()
        return obj if self.rank == root else pickle.loads(payload.numpy().tobytes())


@dataclass
class ClusterContext:
    cfg: ClusterConfig
    role: Role
    session: str
    store: object
    bridges: dict  # pipeline stage -> Channel, for the stages this rank's bridges cover
    reward_bridge: Channel | None = None  # engine leader <-> its reward rank (reward.placement=dedicated)

    @property
    def control(self) -> Channel:
        return self.bridges[0]

    @property
    def is_controller(self) -> bool:
        return self.role.rank == 0


def setup(cfg: ClusterConfig, session: str = "mrlhf", world_size: int | None = None) -> ClusterContext | None:
    """Build this rank's groups. All ranks of the launch call it together. ``session`` prefixes every store key, so a
    set of processes can be re-partitioned (the tests run several layouts on one set of processes); there
    ``world_size`` may be smaller than the launch, and ranks beyond it get None (they sit the session out)."""
    rank = int(os.environ["RANK"])
    world = world_size or int(os.environ["WORLD_SIZE"])
    cfg.validate(world_size=world, cuda=torch.cuda.is_available())
    if rank >= world:
        return None
    store = connect_store(cfg.timeout_s)
    role = role_of(rank, cfg)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if role.kind == "learner":
        if "megatron_async_rlhf.rollout.server" in sys.modules:  # this process was an engine in an earlier session
            sys.modules["megatron_async_rlhf.rollout.server"].close_engines()
        if dist.is_initialized():
            dist.destroy_process_group()
        # learner ranks wait in their own collectives while the controller waits on the rollout pool (an engine's
        # start-up, a generation call): size the learner group's timeout for the longest such wait
        learner_timeout = datetime.timedelta(seconds=cfg.startup_timeout_s + cfg.timeout_s)
        dist.init_process_group(backend, store=dist.PrefixStore(f"{session}/learner/", store),
                                rank=role.learner_rank, world_size=cfg.learner_world, timeout=learner_timeout)
    elif role.kind == "engine" and not (dist.is_initialized() and dist.get_world_size() == 1):
        # vLLM builds its own world from the default group; give it a 1-rank one (never the full launch's world,
        # where vLLM would wait forever for the learners). A default group left from an earlier session in which
        # this process was a learner is replaced.
        if dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        dist.init_process_group("gloo", store=dist.PrefixStore(f"{session}/engine{role.engine}-{rank}/", store),
                                rank=0, world_size=1, timeout=timeout)
    names = {r: f"learner stage owner rank {r}" for r in weight_owners(cfg)}
    names.update({r: f"rollout engine {i} (rank {r})" for i, r in enumerate(engine_leaders(cfg))})
    bridges = {}
    for stage, owner in enumerate(weight_owners(cfg)):
        members = [owner] + engine_leaders(cfg)
        if rank in members:
            pg = _new_group(dist.PrefixStore(f"{session}/bridge{stage}/", store), members.index(rank), len(members),
                            max(cfg.timeout_s, cfg.idle_timeout_s))
            bridges[stage] = Channel(pg, members, names, cfg.timeout_s)
    reward_bridge = None
    for e in range(cfg.reward_ranks):  # objects only: gloo on every machine
        members = [engine_leaders(cfg)[e], reward_rank(cfg, e)]
        if rank in members:
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{session}/reward{e}/", store), members.index(rank), 2,
                                       datetime.timedelta(seconds=max(cfg.timeout_s, cfg.idle_timeout_s)))
            reward_bridge = Channel(pg, members, {members[0]: f"rollout engine {e} (rank {members[0]})",
                                                  members[1]: f"reward rank {members[1]} of engine {e}"}, cfg.timeout_s)
    log.info("rank %d: %s%s, bridges %s", rank, role.kind,
             f" {role.engine}" if role.engine is not None else "", sorted(bridges))
    return ClusterContext(cfg, role, session, store, bridges, reward_bridge)
