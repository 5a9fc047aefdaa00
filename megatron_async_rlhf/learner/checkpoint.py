"""Megatron distributed checkpoints of the learner model: save at one TP/PP, load at any other.

A checkpoint directory holds megatron-core's ``dist_checkpointing`` files plus ``hf_config.json`` (the HF config the
model was built from) and ``mrlhf_meta.json`` (padded vocab, saved layout). Saves are atomic: written to a temporary
sibling directory that is renamed into place once every rank has finished.
"""

from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist

from megatron_async_rlhf.hf_llama import ConfigError
from megatron_async_rlhf.weights.hf_io import replace_dir

META = "mrlhf_meta.json"
HF_CONFIG = "hf_config.json"


def save_model(model, info, hf_config_raw: dict, out_dir: str) -> None:
    """All learner ranks call this together."""
    from megatron.core import dist_checkpointing

    out_dir = os.path.abspath(out_dir)
    tmp = [out_dir + f".tmp-{os.getpid()}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    tmp_dir = tmp[0]
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), tmp_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp_dir, HF_CONFIG), "w") as f:
            json.dump(hf_config_raw, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp_dir, META), "w") as f:
            json.dump({"format": 1, "padded_vocab": info.padded_vocab, "saved_tp": info.tp, "saved_pp": info.pp}, f)
        replace_dir(tmp_dir, out_dir)
    dist.barrier()


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    if not os.path.exists(path):
        raise ConfigError(f"{ckpt_dir} is not a megatron_async_rlhf checkpoint ({META} missing). "
                          f"Fix: create one with `tools/convert_checkpoint.py hf-to-mcore`.")
    with open(path) as f:
        return json.load(f)


def load_model(model, ckpt_dir: str) -> None:
    """Load a checkpoint saved at any TP/PP into this rank's model stage (all learner ranks together)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not fit the model: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}")


def checkpoint_vocab_fits(meta: dict, tp: int) -> None:
    if meta["padded_vocab"] % tp:
        raise ConfigError(
            f"checkpoint vocab is padded to {meta['padded_vocab']}, not divisible by tensor_parallel={tp}. "
            f"Fix: load it at a tensor_parallel dividing {meta['padded_vocab']}, or convert again from HF."
        )
