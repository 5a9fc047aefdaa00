"""The project's bucket transport as a vLLM weight-transfer backend (``weight_transfer_config={"backend":
"mrlhf_shm"}``): vLLM's own weight-update lifecycle (``start_weight_update`` / ``update_weights`` per bucket /
``finish_weight_update``, ``vllm/distributed/weight_transfer/base.py``) drives the load, this engine only says where a
bucket's bytes are and how to load them.

Runs inside each of vLLM's workers (the engine's own process when it runs in-process; one process per TP rank in
multi-process mode). The worker creates it after loading the model (the GPU ``Worker.load_model``, inherited by the
CPU worker) once the backend name is registered in that process: ``worker_ext.py`` registers it at import, and vLLM
imports the module named by ``worker_extension_cls`` in every worker before loading the model.

A bucket (``update_info``) is either ``{"shm": path, "capacity": bytes, "header": [...]}``, a shared-memory file the
engine leader received it into (workers map the same pages, nothing is serialised), or, in-process,
``{"tensors": key}``: the key of (name, tensor) views registered with :func:`put_tensors` (vLLM's in-process RPC
would pass tensors as they are, but a key keeps the update_info a plain value either way).

What stays the project's own around it: the learner's gloo bridge sender and bucket packing (``weights/sync.py``),
the shared-memory ring (``weight_stream.BucketRing``), copying tensors vLLM still holds for an incomplete layer
(``_copy_pending``), the tied ``lm_head`` reload fix and the per-process memory statistics.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import torch
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)

from megatron_async_rlhf.rollout import weight_stream as ws

NAME = "mrlhf_shm"

_TENSORS: dict[int, list] = {}  # in-process buckets by key (put_tensors / taken by receive_weights)
_KEYS = itertools.count()


def put_tensors(named: list) -> dict:
    """The update_info of an in-process bucket: its (name, tensor) list registered under a fresh key (the engine
    takes it out when it loads the bucket)."""
    key = next(_KEYS)
    _TENSORS[key] = named
    return {"tensors": key}


@dataclass
class MrlhfInitInfo(WeightTransferInitInfo):
    """Nothing to set up: the buckets arrive through the project's own bridge and shared memory."""


@dataclass
class MrlhfUpdateInfo(WeightTransferUpdateInfo):
    shm: str = ""
    capacity: int = 0
    header: list = field(default_factory=list)
    tensors: int | None = None


class MrlhfShmEngine(WeightTransferEngine[MrlhfInitInfo, MrlhfUpdateInfo]):
    """Layer-wise reload of HF-named full tensors, bucket by bucket (what ``reload_weights(is_checkpoint_format=True)``
    does in one call): each layer is re-processed (on CPU, repacked for oneDNN) once all of its weights arrived."""

    init_info_cls, update_info_cls = MrlhfInitInfo, MrlhfUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: MrlhfInitInfo) -> None:
        self.stats = {"pid": os.getpid(), "tensors": 0, "peak_extra_bytes": 0}

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        self._rss0 = ws.reset_peak_rss()
        self._tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
        self._loaded = 0
        self._maps = {}  # shared-memory files mapped during this update
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: MrlhfUpdateInfo) -> None:
        if update_info.tensors is not None:
            named = list(_TENSORS.pop(update_info.tensors))
        else:
            named = ws.unpack_shared({"shm": update_info.shm, "capacity": update_info.capacity,
                                      "header": update_info.header}, self._maps)
        if self._tied:
            # vLLM 0.32's layer-wise reload re-creates lm_head apart from embed_tokens, so the tie does not carry the
            # new embedding over ("ParallelLMHead: Failed to load weights", stale logits): load it explicitly, in the
            # same call as the embedding
            named += [("lm_head.weight", t) for n, t in named if n == "model.embed_tokens.weight"]
        with torch.no_grad():
            self.model.load_weights(iter(named))
        _copy_pending({t.untyped_storage().data_ptr() for _, t in named})
        self._loaded += len(named)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        self._maps.clear()
        finalize_layerwise_reload(self.model, self.model_config)
        self.stats = {"pid": os.getpid(), "tensors": self._loaded, "peak_extra_bytes": ws.peak_rss() - self._rss0}

    def shutdown(self) -> None:
        self._maps = {}


def _copy_pending(storages: set[int]) -> None:
    """Copy any tensor of this bucket that vLLM still holds for a layer not complete yet (its other weights in a later
    bucket): the bucket's memory is reused once this call returns. The sender keeps fused groups (q/k/v, gate/up) in
    one bucket, so for LLaMA nothing is pending and this copies nothing."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    for info in list(LAYERWISE_INFO.values()):
        for _, args in info.loaded_weights:
            for k, v in args.arguments.items():
                if k != "param" and isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in storages:
                    args.arguments[k] = v.clone()


def load_bucket(llm, header: list, flat: torch.Tensor) -> None:
    """Load one received bucket into every worker of ``llm`` (vLLM's ``update_weights``, our ``mrlhf_shm`` transfer
    backend): the shared-memory file's name when ``flat`` was made by ``shm_alloc`` (workers in other processes map
    it), else the (name, tensor) views themselves, registered in this process (in-process workers)."""
    path = ws.shm_path(flat)
    if path is not None:
        info = {"shm": path, "capacity": flat.untyped_storage().nbytes(), "header": header}
    else:
        info = put_tensors(ws.unpack(header, flat))
    llm.collective_rpc("update_weights", kwargs={"update_info": info})
