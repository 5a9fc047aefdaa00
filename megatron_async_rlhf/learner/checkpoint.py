"""Megatron distributed checkpoints of the learner model (and optionally its optimizer): save at one TP/PP, load at
any other.

A checkpoint directory holds megatron-core's ``dist_checkpointing`` files plus ``hf_config.json`` (the HF config the
model was built from) and ``mrlhf_meta.json`` (padded vocab, saved layout, whether optimizer state is in it). Saves
are atomic: written to a temporary sibling directory that is renamed into place once every rank has finished (or,
``atomic=False``, straight into a directory the caller renames itself: an RL checkpoint, ``run_state.py``).

Optimizer state (Adam moments and step, fp32 main weights under mixed precision, learning rate) is sharded like the
parameter it belongs to (megatron-core's ``optimizer.sharded_state_dict``; the distributed optimizer in its
``fully_sharded_model_space`` format), so it reshards across TP/PP/DP like the weights.

An atomic save also writes ``manifest.json`` (sha256 of every file, ``manifest.py``) last, every file fsynced before
the rename. Loading runs no code from the files: megatron-core reads ``common.pt`` with ``torch.load``'s default
``weights_only=True`` and torch's ``.distcp`` shards with ``weights_only=True``; torch's ``.metadata`` is a pickle,
which ``check_pickles`` reads first with an unpickler that builds only the checkpoint metadata classes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import torch.distributed as dist

from megatron_async_rlhf.learner import manifest
from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.weights.hf_io import replace_dir

META = "mrlhf_meta.json"
HF_CONFIG = "hf_config.json"


def _sharded(model, optimizer, nested: bool, is_loading: bool = False) -> dict:
    """The sharded state dict to save or load: the model's alone (a weights-only checkpoint), or nested under
    ``model`` next to the optimizer's (the layout of a checkpoint saved with an optimizer, also when only its weights
    are loaded)."""
    msd = model.sharded_state_dict()
    if not nested:
        return msd
    out = {"model": msd}
    if optimizer is not None:
        out["optimizer"] = optimizer.sharded_state_dict(msd, is_loading=is_loading)
    return out


def save_model(model, info, hf_config_raw: dict, out_dir: str, optimizer=None, atomic: bool = True) -> None:
    """All learner ranks call this together. With ``optimizer``, its state is saved too (see the module doc)."""
    from megatron.core import dist_checkpointing

    from megatron_async_rlhf.preemption import checkpoint_writer_dies_with_us

    checkpoint_writer_dies_with_us()
    out_dir = os.path.abspath(out_dir)
    tmp = [out_dir + f".tmp-{os.getpid()}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    tmp_dir = tmp[0] if atomic else out_dir
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    dist.barrier()
    dist_checkpointing.save(_sharded(model, optimizer, nested=optimizer is not None), tmp_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp_dir, HF_CONFIG), "w") as f:
            json.dump(hf_config_raw, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp_dir, META), "w") as f:
            json.dump({"format": 1, "padded_vocab": info.padded_vocab, "saved_tp": info.tp, "saved_pp": info.pp,
                       "optimizer": optimizer is not None}, f)
        if atomic:
            manifest.write_manifest(tmp_dir)  # fsyncs every file: on disk before the rename makes it visible
            replace_dir(tmp_dir, out_dir)
            manifest.fsync_dir(os.path.dirname(out_dir))
    dist.barrier()


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    if not os.path.exists(path):
        raise ConfigError(f"{ckpt_dir} is not a megatron_async_rlhf checkpoint ({META} missing). "
                          f"Fix: create one with `tools/convert_checkpoint.py hf-to-mcore`.")
    with open(path) as f:
        return json.load(f)


def load_model(model, ckpt_dir: str, optimizer=None) -> None:
    """Load a checkpoint saved at any TP/PP into this rank's model stage (all learner ranks together); with
    ``optimizer``, its state too (the checkpoint must have been saved with one)."""
    from megatron.core import dist_checkpointing

    nested = bool(read_meta(ckpt_dir).get("optimizer"))
    check_pickles(ckpt_dir)
    if optimizer is not None and not nested:
        raise ConfigError(f"{ckpt_dir} holds model weights only, no optimizer state to resume from")
    state = dist_checkpointing.load(_sharded(model, optimizer, nested, is_loading=True), ckpt_dir)
    # the model first: under mixed precision the optimizer's fp32 main weights are then copied from the checkpoint
    missing, unexpected = model.load_state_dict(state["model"] if nested else state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not fit the model: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])


# What torch's distributed checkpoint metadata (``.metadata``) is built from; nothing else is resolved.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        obj = super().find_class(module, name) if module.startswith("torch.distributed.checkpoint.") or \
            module in ("torch", "torch.serialization", "collections") else None
        ok = (module, name) in _METADATA_GLOBALS or (module in _METADATA_MODULES and isinstance(obj, type)) or \
            (module == "torch" and isinstance(obj, torch.dtype))
        if not ok:
            raise pickle.UnpicklingError(f"global {module}.{name} is not checkpoint metadata")
        return obj


def check_pickles(ckpt_dir: str) -> None:
    """Refuse a checkpoint whose torch ``.metadata`` pickles name anything but checkpoint metadata classes, or whose
    ``common.pt`` does not load with ``weights_only=True`` (a checkpoint from elsewhere could otherwise run code when
    loaded), before megatron-core reads them."""
    import torch

    for name in sorted(os.listdir(ckpt_dir)):
        if name.endswith(".metadata") or name == "common.pt":
            path = os.path.join(ckpt_dir, name)
            try:
                if name == "common.pt":
                    torch.load(path, map_location="cpu", weights_only=True)
                    continue
                with open(path, "rb") as f:
                    _MetadataUnpickler(f).load()
            except Exception as e:  # noqa: BLE001 -- whatever it is, the file is not what torch wrote
                raise ConfigError(f"checkpoint file {path} is not torch checkpoint metadata ({e}); refused. Fix: "
                                  "load a checkpoint this project wrote") from None


def checkpoint_vocab_fits(meta: dict, tp: int) -> None:
    if meta["padded_vocab"] % tp:
        raise ConfigError(
            f"checkpoint vocab is padded to {meta['padded_vocab']}, not divisible by tensor_parallel={tp}. "
            f"Fix: load it at a tensor_parallel dividing {meta['padded_vocab']}, or convert again from HF."
        )
