"""Run megatron-core on CPU (gloo): the patches for its CUDA-only call sites, in one place.

Activated by :func:`activate` only when CUDA is absent; GPU runs never call it. Every patch names the megatron-core
site it covers. Checked against megatron-core 0.16.1 (the CPU environment, Python 3.11); the sites below were read in
that version's sources. Sequence parallelism, packed sequences (THD) and context parallelism stay GPU-only
(they need Transformer Engine or Apex); config validation rejects them on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE = False


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # a bare int is a CUDA ordinal (`device=torch.cuda.current_device()`); bools are not devices
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Maps CUDA device arguments to the CPU for every torch call in the process.

    Covers, in megatron-core 0.16.1: literal ``device="cuda"`` in ``pipeline_parallel/schedules.py``
    (loss/num-token tensors, also at PP=1), ``optimizer/`` and ``transformer/`` (attention_mask=None path);
    ``device=torch.cuda.current_device()`` in ``GlobalMemoryBuffer.get_tensor`` (``utils.py``),
    ``RotaryEmbedding.get_emb`` (``models/common/embeddings/rotary_pos_embedding.py``), the DDP grad buffers
    (``distributed/param_and_grad_buffer.py``), the TP logit gather and ``dist_checkpointing`` save;
    ``Tensor.cuda()`` calls; and the ``tensor.type() == 'torch.cuda.FloatTensor'`` checks in
    ``optimizer/clip_grads.py``, ``optimizer/optimizer.py`` and ``optimizer/distrib_optimizer.py``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # the optimizer's dtype checks compare against the CUDA type name; report CPU float tensors as such
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") and "cuda" not in name else name
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _DummyStream:
    """Stands in for ``torch.cuda.current_stream()`` / ``torch.cuda.Stream`` (DDP in
    ``distributed/distributed_data_parallel.py`` and ``param_and_grad_buffer.py``): CPU work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


def _install_cpu_rng_tracker() -> None:
    """``tensor_parallel/random.py``: ``CudaRNGStatesTracker.add/fork`` read and set CUDA generator states. Replace the
    global tracker with one that keeps CPU generator states under the same names, so ``get_cuda_rng_tracker().fork()``
    in the TP layers' initialisation and dropout works."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute (``CheckpointFunction`` in the same file: ``learner.recompute`` selective and full) saves
    # and restores the "device" generator through these two helpers; on the CPU that generator is the CPU one.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)

    # ``CheckpointFunction.backward`` re-runs the forward inside autograd's backward. The backward call reached it
    # through ``_CudaToCpu`` (``torch.autograd.backward`` dispatches to the mode), which runs with the mode popped,
    # so the re-run forward would meet ``device="cuda"`` (``transformer/utils.py get_default_causal_mask``) bare.
    # Re-enter the mode for the re-run.
    if not getattr(mrandom.CheckpointFunction.backward, "_cpu_compat", False):
        backward = mrandom.CheckpointFunction.backward

        def backward_on_cpu(ctx, *args):
            with _CudaToCpu():
                return backward(ctx, *args)

        backward_on_cpu._cpu_compat = True
        mrandom.CheckpointFunction.backward = staticmethod(backward_on_cpu)


def seed_cpu_rng_tracker(seed: int, tp_rank: int) -> None:
    """CPU twin of ``model_parallel_cuda_manual_seed``: the same three named states, the same seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    _install_cpu_rng_tracker()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


# Warnings megatron-core 0.16.1 (and torch 2.13 under it) prints on every CPU process; each states a known fact of a
# CPU machine (no Apex/TE; CUDA-only tuning advice; deprecations inside megatron-core's own calls), none needs action.
_EXPECTED_ON_CPU = (
    r"Apex is not installed",
    r"Transformer Engine and Apex are not installed",
    r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
    r"full scope is deprecated",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"`load_state_dict` is deprecated",
    r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",  # distributed optimizer
    r"the core_attn is from transformer_engine",  # learner.recompute=selective: TE advice; no TE here
    # DistributedOptimizer.zero_grad (optimizer/optimizer.py _zero_grad_group_helper) reads `.grad` of its shard views
    r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)


def activate() -> None:
    """Install the CPU patches (idempotent). Must not be called when CUDA is available. Call before megatron-core is
    imported, so that the warning filters below see its import-time warnings."""
    global _ACTIVE
    if _ACTIVE:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.activate() called on a machine with CUDA; GPU runs use megatron-core unpatched")
    for pattern in _EXPECTED_ON_CPU:
        warnings.filterwarnings("ignore", message=pattern)
    # torch.cuda.* entry points that megatron-core calls unconditionally
    torch.cuda.current_device = lambda: 0  # an ordinal; _CudaToCpu maps device=0 to the CPU
    torch.cuda.synchronize = lambda *a, **k: None  # timers, checkpoint save, schedules
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    torch.cuda.Stream = _DummyStream
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None  # CPU seeding goes through seed_cpu_rng_tracker
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    _install_cpu_rng_tracker()
    _CudaToCpu().__enter__()  # process-wide for the rest of the process: pushed once, never popped
    _ACTIVE = True
    log.info(
        "megatron-core CPU compatibility layer active (no CUDA): CUDA device arguments map to the CPU, "
        "CPU RNG tracker installed; checked against megatron-core 0.16.1"
    )
