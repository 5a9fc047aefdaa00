"""vLLM worker extension (``LLM(worker_extension_cls=...)``): load HF-named full tensors into the running model, one
bucket at a time.

Runs inside each of vLLM's workers (the engine's own process when it runs in-process; one process per TP rank in
multi-process mode). A sync is three calls: ``begin_weight_stream``, ``load_weight_bucket`` per bucket,
``finish_weight_stream``. They split what vLLM's ``reload_weights(is_checkpoint_format=True)`` does in one call:
layer-wise reload goes through the model's own ``load_weights`` (which fuses q/k/v and gate/up for vLLM's layout and
shards for the engine's TP) and re-runs each layer's weight post-processing as soon as all of that layer's weights
arrived, so a bucket can be dropped once its call returns. Plain ``model.load_weights`` after start-up is wrong on
CPU, where linear weights have been repacked for oneDNN.

A bucket arrives as a list of (name, tensor) in-process, or, across processes, as the name of a shared-memory file
holding its bytes plus the header: no tensor goes through vLLM's RPC serialisation.
"""

from __future__ import annotations

import os

import torch

from megatron_async_rlhf.rollout import weight_stream as ws


class WeightReceiver:
    def begin_weight_stream(self) -> int:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        if not getattr(self, "_mrlhf_quiet", False):  # rotary embeddings have no weights to reload: not news
            import logging

            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
                lambda r: "RotaryEmbedding: Failed to load weights" not in r.getMessage())
            self._mrlhf_quiet = True
        self._mrlhf_rss0 = ws.reset_peak_rss()
        self._mrlhf_tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
        self._mrlhf_loaded = 0
        self._mrlhf_maps = {}  # shared-memory files mapped during this sync
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        return os.getpid()

    def load_weight_bucket(self, bucket) -> int:
        """``bucket``: [(HF name, tensor)], or {"shm": path, "header": [...]} from another process. Returns the number
        of tensors loaded."""
        from vllm.config import set_current_vllm_config

        if isinstance(bucket, dict):
            named = ws.unpack_shared(bucket, self._mrlhf_maps)
        else:
            named = list(bucket)
        if self._mrlhf_tied:
            # vLLM 0.32's layer-wise reload re-creates lm_head apart from embed_tokens, so the tie does not carry the
            # new embedding over ("ParallelLMHead: Failed to load weights", stale logits): load it explicitly, in the
            # same call as the embedding
            named += [("lm_head.weight", t) for n, t in named if n == "model.embed_tokens.weight"]
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self.model_runner.get_model().load_weights(iter(named))
        _copy_pending({t.untyped_storage().data_ptr() for _, t in named})
        self._mrlhf_loaded += len(named)
        return len(named)

    def finish_weight_stream(self) -> dict:
        """Process what is left (layers without weights, attention), drop caches derived from the old weights.
        Returns this process's pid, tensors loaded and peak extra resident memory since ``begin_weight_stream``."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        self._mrlhf_maps.clear()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(runner.get_model(), self.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        return {"pid": os.getpid(), "tensors": self._mrlhf_loaded,
                "peak_extra_bytes": ws.peak_rss() - self._mrlhf_rss0}


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
