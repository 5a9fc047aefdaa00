"""HF checkpoint files: read tensors by name from *.safetensors (single or index-sharded), write them back.

Pure (safetensors + torch): the converter, the parity tool and the weight loaders all read through here.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# files beside the weights that a usable HF model directory carries over (tokenizer, generation settings)
COPY_ALONG = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class HFCheckpoint:
    """Lazy, name-addressed view of the tensors in an HF model directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                wm = json.load(f)["weight_map"]
            self._file_of = {k: os.path.join(self.path, v) for k, v in wm.items()}
        else:
            files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(
                    f"no *.safetensors in {self.path}. Fix: save the model with "
                    f"`model.save_pretrained(dir, safe_serialization=True)`."
                )
            self._file_of = {}
            for fn in files:
                with safe_open(fn, framework="pt") as f:
                    for k in f.keys():
                        self._file_of[k] = fn
        self._handles: dict[str, object] = {}

    def _handle(self, fn: str):
        h = self._handles.get(fn)
        if h is None:
            h = self._handles[fn] = safe_open(fn, framework="pt")
        return h

    def names(self) -> list[str]:
        return list(self._file_of)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self._handle(fn).get_slice(k).get_shape()) for k, fn in self._file_of.items()}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"tensor {name} is missing from the HF checkpoint in {self.path}")
        return self._handle(self._file_of[name]).get_tensor(name)


def save_hf(out_dir: str, tensors: dict[str, torch.Tensor], config: dict, copy_from: str | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (+ tokenizer files from ``copy_from``) atomically: everything
    goes to a temporary sibling directory that is renamed into place, so a crash never leaves half a model."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if copy_from:
            for name in COPY_ALONG:
                src = os.path.join(copy_from, name)
                if os.path.exists(src):
                    shutil.copy2(src, os.path.join(tmp, name))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str, dst: str) -> None:
    """Move a finished directory into place; an existing ``dst`` is replaced only after ``src`` is complete."""
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
