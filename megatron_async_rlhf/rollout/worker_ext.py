"""vLLM worker extension (``LLM(worker_extension_cls=...)``): load HF-named full tensors into the running model.

Runs inside vLLM's worker. ``reload_weights(is_checkpoint_format=True)`` goes through the model's own
``load_weights`` (which fuses q/k/v and gate/up for vLLM's layout and shards for the engine's TP) and then re-runs
weight post-processing; plain ``model.load_weights`` after start-up is wrong on CPU, where linear weights have been
repacked for oneDNN.
"""

from __future__ import annotations

import torch


class WeightReceiver:
    def load_hf_weights(self, weights) -> int:
        """``weights``: a list of (HF name, tensor), or safetensors bytes when the worker runs in another process
        (vLLM's multiprocessing RPC does not carry tensors). Returns the number of tensors loaded."""
        if isinstance(weights, (bytes, bytearray)):
            from safetensors.torch import load

            named = list(load(bytes(weights)).items())
        else:
            named = list(weights)
        names = {n for n, _ in named}
        if getattr(self.model_config.hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in names:
            # vLLM 0.32's layer-wise reload re-creates lm_head apart from embed_tokens, so the tie does not carry the
            # new embedding over ("ParallelLMHead: Failed to load weights", stale logits): load it explicitly
            named += [("lm_head.weight", t) for n, t in named if n == "model.embed_tokens.weight"]
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        return len(named)


def to_safetensors_bytes(named: list[tuple[str, torch.Tensor]]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous().cpu() for k, v in named})

