"""GGUF -> HF LLaMA directory: dequantize with transformers' GGUF loader, then save an ordinary checkpoint.

transformers (with the ``gguf`` package) turns a GGUF file into a ``LlamaForCausalLM`` whose config still carries a
``quantization_config``; ``save_pretrained`` refuses such a model ("quantized with GGUF, not serializable"). So the
config is rebuilt without it and the dequantized state dict is written as plain safetensors, with the tokenizer (its
chat template included) and a ``generation_config.json`` whose ``eos_token_id`` lists every id that ends a turn.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from megatron_async_rlhf.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")


def check_gguf_inputs(gguf_file: str, dtype: str) -> None:
    """Everything ``gguf_to_hf`` needs, checked before the (slow) load."""
    if not os.path.isfile(gguf_file):
        raise ConfigError(f"GGUF file {gguf_file} does not exist. Fix: pass --gguf PATH/TO/model.gguf")
    if not gguf_file.endswith(".gguf"):
        raise ConfigError(f"{gguf_file} is not a .gguf file")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: use one of {list(DTYPES)}")
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"reading GGUF needs the packages {missing}. Fix: bash tools/install.sh (or pip install "
                          + " ".join(missing) + ")")


def gguf_to_hf(gguf_file: str, out_dir: str, dtype: str = "float32") -> str:
    """Write an HF LLaMA directory (model.safetensors, clean config.json, tokenizer, generation_config.json) made
    from ``gguf_file`` to ``out_dir``, atomically (a temporary sibling directory renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from megatron_async_rlhf.weights.hf_io import replace_dir

    check_gguf_inputs(gguf_file, dtype)
    folder, name = os.path.split(os.path.abspath(gguf_file))
    torch_dtype = getattr(torch, dtype)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if quantized.config.model_type != "llama":
        raise ConfigError(f"{gguf_file}: model_type={quantized.config.model_type!r}; only LLaMA-architecture GGUF "
                          "files convert to this trainer's models")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    raw = quantized.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        raw.pop(k, None)
    raw["dtype"] = dtype
    config = LlamaConfig(**raw)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        clean = LlamaForCausalLM(config)
    clean.load_state_dict(quantized.state_dict(), assign=True)
    clean = clean.to(torch_dtype)
    if config.tie_word_embeddings:
        clean.tie_weights()

    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos if len(eos) != 1 else eos[0],
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    clean.generation_config = gen

    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=os.path.dirname(out_dir))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump({"gguf": os.path.abspath(gguf_file), "dtype": dtype}, f)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s (%s)", gguf_file, out_dir, dtype)
    return out_dir
