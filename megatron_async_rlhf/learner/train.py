"""Learner training: megatron-core DDP + optimizer, and one optimizer step over micro-batches through the pipeline
schedule. The loss is a plug-in: ``loss_fn(logprobs [b, s-1], batch) -> (loss, metrics)``, computed on the last
pipeline stage from vocab-parallel log-probs (exact under TP)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from megatron_async_rlhf.learner.logprobs import vocab_parallel_logprobs


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    """Adam learning rate."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over the learner's data-parallel ranks."""
    head_lr_mult: float = 1.0
    """Learning-rate multiplier of the output layer (the scalar head of a reward model or critic), honoured by
    :func:`set_lr`."""


def wrap_for_training(model, oc: OptimConfig):
    """(DDP-wrapped model, megatron optimizer). The unwrapped ``model`` stays the one the weight mapping addresses.

    A bf16 model (``learner.precision=bf16``) trains in Megatron mixed precision: gradients accumulate and reduce in
    fp32 (``grad_reduce_in_fp32``), the optimizer keeps fp32 main weights and Adam state and copies the updated
    weights back to the bf16 model after each step (no loss scaling: bf16 has fp32's exponent range)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer, get_standard_config_overrides

    cfg = model.config
    ddp = DistributedDataParallel(
        config=cfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=oc.distributed_optimizer),
        module=model,
    )
    # DP all-reduce of grads and the tied-embedding all-reduce between first and last PP stages
    cfg.finalize_model_grads_func = finalize_model_grads
    ocfg = OptimizerConfig(
        optimizer="adam", lr=oc.lr, weight_decay=oc.weight_decay, adam_beta1=oc.adam_beta1,
        adam_beta2=oc.adam_beta2, clip_grad=oc.clip_grad, bf16=cfg.bf16, fp16=cfg.fp16,
        params_dtype=cfg.params_dtype, use_distributed_optimizer=oc.distributed_optimizer,
    )
    # megatron-core's default param groups (what it builds when given none); with a head multiplier, the head in a
    # group of its own marked with it (its ``lr_mult`` field, read by set_lr). Keyword only: the positional arguments
    # after the first two changed meaning across megatron-core releases.
    overrides = get_standard_config_overrides(ocfg)
    if oc.head_lr_mult != 1.0:
        overrides[ParamKey(name="*output_layer.weight")] = {"lr_mult": oc.head_lr_mult}
    return ddp, get_megatron_optimizer(ocfg, [ddp], config_overrides=overrides)


def set_lr(opt, lr: float, schedule: str = "constant", done: int = 0, total: int = 1, warmup: int = 0) -> float:
    """Set the optimizer's learning rate for its next step and return it: ``lr`` (constant), or ``lr`` decayed
    linearly to 0 over ``total`` steps after ``done`` of them (linear). With ``warmup``, the first ``warmup`` steps
    rise linearly to ``lr`` (``lr * (done + 1) / warmup``) and the decay spans the ``total - warmup`` after them.
    A param group's ``lr_mult`` (``OptimConfig.head_lr_mult``) scales its rate."""
    if done < warmup:
        lr = lr * (done + 1) / warmup
    elif schedule == "linear":
        lr = lr * (1.0 - (done - warmup) / (total - warmup))
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


def from_last_stage(obj):
    """``obj`` as the last pipeline stage holds it, on every stage (the controller, a first-stage rank, logs it)."""
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


@contextlib.contextmanager
def variable_shapes(model, micro_batches: list[torch.Tensor]):
    """Micro-batches of different shapes through a pipeline: megatron-core's p2p sends each activation's shape
    before the activation (``variable_seq_lengths``) for the duration of the call; equal shapes keep the fixed-shape
    path."""
    cfg = model.config
    before = cfg.variable_seq_lengths
    cfg.variable_seq_lengths = before or len({tuple(t.shape) for t in micro_batches}) > 1
    try:
        yield
    finally:
        cfg.variable_seq_lengths = before


LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def model_device(model) -> torch.device:
    """Where the model's (this stage's) weights live: the CPU, or this rank's GPU."""
    return next(model.parameters()).device


def on_device(obj, device: torch.device):
    """``obj`` with every tensor in it (a tensor, or a dict / list / tuple of them, one level deep) on ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(v.to(device) if torch.is_tensor(v) else v for v in obj)
    return obj


def train_step(ddp, optimizer, micro_batches: list[dict], loss_fn: LossFn, vocab_size: int,
               temperature: float = 1.0, head_fn: Callable[[torch.Tensor, dict], torch.Tensor] | None = None) -> dict:
    """One optimizer step. ``loss_fn`` reads the log-probs ``[b, s-1]`` of each next token, or with ``head_fn``
    whatever ``head_fn(model output, micro-batch)`` makes of the last stage's output (a value model's values)."""
    return _train_step(ddp, optimizer, micro_batches, loss_fn, head_fn or partial(_next_token_logprobs, vocab_size,
                                                                                   temperature))


def _next_token_logprobs(vocab_size: int, temperature: float, output: torch.Tensor, batch: dict) -> torch.Tensor:
    return vocab_parallel_logprobs(output[:, :-1], batch["tokens"][:, 1:], vocab_size, temperature)  # [b, s-1]


def _train_step(ddp, optimizer, micro_batches: list[dict], loss_fn: LossFn, head_fn) -> dict:
    """One optimizer step. Each micro-batch is a dict with ``tokens [b, s]`` (and whatever ``loss_fn`` reads); shapes
    may differ between micro-batches. The step minimises ``sum_i weight_i * loss_i`` over the micro-batches, with
    ``weight`` from the dict (its share of the batch's loss units; default: equal shares), so a loss that is a mean
    within its micro-batch becomes the mean over the batch. Returns the metrics on the last stage, weighted the same
    way, plus grad norm, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    it = iter(micro_batches)
    n = len(micro_batches)
    metrics: list[tuple[float, dict]] = []

    def loss_func(batch, output):
        loss, m = loss_fn(head_fn(output, batch), batch)
        w = float(batch.get("weight", 1.0 / n))
        metrics.append((w, {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in m.items()}))
        return loss * (w * n), {}  # megatron-core divides by the number of micro-batches

    device = model_device(ddp)

    def step(data_iterator, model):
        batch = on_device(next(data_iterator), device)  # micro-batches are built on the CPU; the model may be on a GPU
        tokens = batch["tokens"]
        pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)  # [b, s]
        return model(tokens, pos, None), partial(loss_func, batch)

    b, s = micro_batches[0]["tokens"].shape
    with variable_shapes(ddp, [m["tokens"] for m in micro_batches]):
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=it, model=[ddp], num_microbatches=n,
            seq_length=s, micro_batch_size=b, forward_only=False,
        )
    ok, grad_norm, _ = optimizer.step()
    out = {}
    if metrics:
        total = sum(w for w, _ in metrics)
        out = {k: max(m[k] for _, m in metrics if k in m) if k.endswith("_max")  # a maximum stays one
               else sum(w * m[k] for w, m in metrics if k in m) / total for k in metrics[0][1]}
    out = from_last_stage(out)
    out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    out["update_ok"] = bool(ok)
    return out
