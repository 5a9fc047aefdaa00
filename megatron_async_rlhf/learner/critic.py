"""The value model on the learner, for algorithms that use a critic (``algorithm.name=ppo_critic``: the paper's PPO).

A second Megatron model with the policy's TP/PP layout and its own optimizer: the scalar-head model of
``learner/value_head.py``, initialised from the reward model (``reward.kind=reward_model``) or else from the policy's
current weights (trunk; the head starts fresh). Per learner step, with ``learner/step.py``'s micro-batches (this
data-parallel replica's rows, like the policy's): old
values (forward, :meth:`Critic.old_values`), then, after the policy's update, one step of the algorithm's value loss
(:meth:`Critic.step`); the advantages in between are the algorithm's (``algorithms/ppo_critic.py``).

Values are read at the positions of the learner's ``[b, s-1]`` log-prob layout: position p holds V(tokens <= p), the
state in which token p+1 is chosen, so the same ``mask`` selects the completion's states. Everything that needs
values lives on the last pipeline stage, like the reference log-probs.
"""

from __future__ import annotations

import torch


def _values(output: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
    return output[..., 0][:, :-1].float()  # [b, s, 1] -> [b, s-1]: V of each prefix that predicts a next token


class Critic:
    def __init__(self, ddp, opt, model):
        self.ddp, self.opt, self.model = ddp, opt, model

    def old_values(self, micro_batches: list[dict]) -> None:
        """``old_values [b, s-1]`` into each micro-batch, on the last pipeline stage (all learner ranks call it)."""
        from megatron_async_rlhf.learner.forward import forward_collect

        self.ddp.eval()
        outs = forward_collect(self.ddp, [m["tokens"] for m in micro_batches], lambda out, i: _values(out))
        for m, v in zip(micro_batches, outs):
            m["old_values"] = v * m["mask"]

    def step(self, micro_batches: list[dict], value_loss, scale: float = 1.0) -> dict:
        """One optimizer step of the algorithm's ``value_loss(values, micro_batch) -> (loss, metrics)``; micro-batches
        keep the policy step's ``weight`` (token shares), so the loss is the batch's token mean whatever the split.
        ``scale``: the policy step's factor on this data-parallel replica's loss (``learner/step.py``: its share of
        all replicas' loss units x dp), so the value gradient too is the whole batch's. Metrics: this replica's."""
        from megatron_async_rlhf.learner.train import train_step

        def loss_fn(values, m):
            loss, mm = value_loss(values, m)
            return loss * scale if scale != 1.0 else loss, mm

        out = train_step(self.ddp, self.opt, micro_batches, loss_fn, 0, head_fn=_values)
        return {("critic_grad_norm" if k == "grad_norm" else k): v for k, v in out.items() if k != "update_ok"}


def build_critic(cfg, mcfg, policy) -> Critic | None:
    """The value model, its DDP wrapper and optimizer (lr: the algorithm's ``critic_lr``, else ``algorithm.lr``), or
    None when the algorithm uses no critic. All learner ranks call it together, after the policy's warm start."""
    from megatron_async_rlhf.algorithms import build_algorithm
    from megatron_async_rlhf.learner.model import build_model
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training
    from megatron_async_rlhf.learner.build import value_model_from_hf

    ac, lc = cfg.algorithm, cfg.learner
    algo = build_algorithm(ac)
    if not algo.uses_critic:
        return None
    if cfg.reward.kind == "reward_model":
        _, model, _ = value_model_from_hf(cfg.reward.reward_model_path, cfg.cluster.learner_tp, cfg.cluster.learner_pp,
                                          dtype=lc.params_dtype, recompute=lc.recompute)
    else:
        model, _ = build_model(mcfg, dtype=lc.params_dtype, init=False, recompute=lc.recompute, head="score")
        trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("output_layer.")}
        mine = model.state_dict()
        missing = sorted(k for k in mine if k not in trunk and not k.startswith("output_layer.")
                         and not k.endswith("_extra_state"))
        if missing:
            raise RuntimeError(f"critic trunk weights missing from the policy: {missing[:5]}")
        model.load_state_dict({k: v for k, v in trunk.items() if k in mine}, strict=False)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=getattr(algo.cfg, "critic_lr", 0.0) or ac.lr, clip_grad=ac.clip_grad,
                                                    distributed_optimizer=lc.distributed_optimizer))
    return Critic(ddp, opt, model)
