"""vLLM worker extension (``LLM(worker_extension_cls=...)``): imported by vLLM in each of its workers (the engine's
own process when it runs in-process; one process per TP rank in multi-process mode) before the model is loaded.

Importing it registers the project's weight-transfer backend ``mrlhf_shm`` (``transfer_backend.py``) with vLLM's
``WeightTransferEngineFactory`` in that process, so the worker builds it after loading the model
(``weight_transfer_config={"backend": "mrlhf_shm"}``). A sync is then vLLM's own weight-update lifecycle, driven by
the engine leader over ``collective_rpc``: ``start_weight_update``, ``update_weights`` per bucket,
``finish_weight_update``. This class only adds what vLLM's lifecycle does not report or reset: the statistics of the
last update and the runner's caches derived from the old weights.
"""

from __future__ import annotations

from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from megatron_async_rlhf.rollout.transfer_backend import NAME

if NAME not in WeightTransferEngineFactory._registry:  # once per process (a second engine re-imports nothing)
    WeightTransferEngineFactory.register_engine(NAME, "megatron_async_rlhf.rollout.transfer_backend",
                                                "MrlhfShmEngine")


class WeightReceiver:
    def mrlhf_quiet_reload(self) -> None:
        """Rotary embeddings have no weights to reload: vLLM's layer-wise reload says so on every update; not news."""
        import logging

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda r: "RotaryEmbedding: Failed to load weights" not in r.getMessage())

    def mrlhf_finish_stats(self) -> dict:
        """After ``finish_weight_update``: drop the runner's caches derived from the old weights (vLLM's finish resets
        only LoRA state) and return this process's pid, tensors loaded and peak extra resident memory during the
        update."""
        runner = self.model_runner
        for reset in ("reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        return dict(self.weight_transfer_engine.stats)
