"""Megatron parallel state over the learner pool.

The default torch.distributed group of a learner process must be the learner pool only (never the rollout ranks):
megatron-core 0.16.1's ``initialize_model_parallel`` always builds its groups over the default world.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def use_cuda() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    return "nccl" if use_cuda() else "gloo"


def init_learner_parallel(tp: int, pp: int, seed: int = 1234, timeout_s: float = 600.0) -> None:
    """(Re)build Megatron's TP/PP/DP groups over the current default group and seed its RNG tracker.

    Calling it again with another layout tears down the previous groups first, so one set of processes can run several
    layouts (the test suite shares its process start-ups this way).
    """
    if not use_cuda():
        from megatron_async_rlhf.learner import cpu_compat

        cpu_compat.activate()  # before megatron-core's first import
    from megatron.core import parallel_state

    assert dist.is_initialized(), "init the learner pool's default process group first"
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"learner pool of {world} ranks cannot hold tensor_parallel={tp} x pipeline_parallel={pp}")
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    layout = (tp, pp, world, dist.distributed_c10d._get_default_group())  # the object, not its id: ids get reused
    global _LAYOUT
    if parallel_state.model_parallel_is_initialized() and _LAYOUT == layout:
        pass  # same groups already built over the same default group: keep them
    else:
        if parallel_state.model_parallel_is_initialized():
            _destroy_megatron_groups()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )
        _LAYOUT = layout
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if use_cuda():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        from megatron_async_rlhf.learner.cpu_compat import seed_cpu_rng_tracker

        seed_cpu_rng_tracker(seed, tp_rank)


_LAYOUT: tuple | None = None


def _destroy_megatron_groups() -> None:
    """Tear down megatron's groups for real: ``destroy_model_parallel`` only forgets them, and every gloo group keeps
    its TCP threads alive (a process re-partitioned many times would pile up hundreds of polling threads)."""
    from megatron.core import parallel_state

    default = dist.distributed_c10d._get_default_group()
    for pg in list(dist.distributed_c10d._world.pg_map):
        if pg is not default:
            dist.destroy_process_group(pg)
    parallel_state.destroy_model_parallel()


def ranks() -> dict[str, int]:
    """This process's coordinates in the learner layout."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp": ps.get_data_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(),
    }
