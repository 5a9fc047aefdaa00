"""One learner step on a batch of samples: rows and masks, reference log-probs, the algorithm's loss, the update.

Glue between the schedule (train.py) and the pure losses (algorithms/). Every learner rank calls these together;
reference log-probs and the loss live on the last pipeline stage.
"""

from __future__ import annotations

import math

import torch

from megatron_async_rlhf import algorithms as A
from megatron_async_rlhf.config import AlgorithmConfig
from megatron_async_rlhf.learner.forward import pad_batch, token_logprobs
from megatron_async_rlhf.learner.train import train_step


class NonFiniteLoss(RuntimeError):
    pass


def _rows(seqs: list[list[int]], starts: list[int], micro: int, extra: list[torch.Tensor] | None = None):
    """Padded tokens ``[R, S]`` (R a multiple of ``micro``), completion mask ``[R, S-1]`` (1 on positions predicting
    a completion token) and a valid-row flag ``[R]``."""
    n = len(seqs)
    rows = max(micro, -(-n // micro) * micro)
    tokens = pad_batch(seqs, rows)
    mask = torch.zeros(rows, tokens.shape[1] - 1)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        mask[i, st - 1: len(s) - 1] = 1.0
    valid = torch.zeros(rows, dtype=torch.bool)
    valid[:n] = True
    return tokens, mask, valid


def micro_size(n: int, micro: int, multiple: int = 1) -> int:
    """Rows per micro-batch for ``n`` rows and a cap of ``micro``: as few micro-batches as the cap allows, rows spread
    evenly over them (a multiple of ``multiple``: 2 keeps DPO pairs together), so padding rows stay few. A batch of 4
    pairs with ``micro=16`` trains 8 rows, not 16."""
    cap = max(multiple, micro - micro % multiple)
    count = -(-n // cap)
    size = -(-n // count)
    return -(-size // multiple) * multiple


def _split(d: dict, micro: int) -> list[dict]:
    rows = d["tokens"].shape[0]
    return [{k: (v[i:i + micro] if torch.is_tensor(v) else v) for k, v in d.items()} for i in range(0, rows, micro)]


def sft_step(ddp, opt, prompts: list[list[int]], answers: list[list[int]], vocab_size: int, micro: int) -> dict:
    """Supervised step: mean NLL of the answer tokens given the prompt."""
    micro = micro_size(len(prompts), micro)
    tokens, mask, valid = _rows([p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts], micro)

    def loss_fn(lp, b):
        loss = -(lp * b["mask"]).sum() / b["mask"].sum().clamp(min=1)
        return loss, {"loss": loss.detach()}

    return train_step(ddp, opt, _split({"tokens": tokens, "mask": mask}, micro), loss_fn, vocab_size)


def rl_step(batch, rewards: torch.Tensor, ac: AlgorithmConfig, ddp, opt, ref_model, vocab_size: int) -> dict:
    """One RL update on ``batch.samples`` (prompt-major, k per prompt) with scalar ``rewards [N]``."""
    samples, k = batch.samples, ac.samples_per_prompt
    r = rewards.view(-1, k)  # [P, k]
    metrics: dict = {"reward_mean": rewards.mean().item()}
    if ac.name == "online_dpo":
        chosen, rejected, ok = A.select_pairs(r)
        order = [p * k + int(i) for p in range(r.shape[0]) if ok[p] for i in (chosen[p], rejected[p])]
        metrics["pairs"] = len(order) // 2
        if not order:
            return {**metrics, "skipped": 1.0}  # every prompt tied: no preference to learn from
    else:
        order = list(range(len(samples)))
    micro = micro_size(len(order), ac.micro_batch, 2 if ac.name == "online_dpo" else 1)
    picked = [samples[i] for i in order]
    seqs = [s.prompt_ids + s.token_ids for s in picked]
    tokens, mask, valid = _rows(seqs, [len(s.prompt_ids) for s in picked], micro)
    ref = token_logprobs(ref_model, tokens, vocab_size, ac.temperature, micro)  # [R, S-1] on the last stage
    sampler = torch.zeros_like(mask)
    for i, s in enumerate(picked):
        st = len(s.prompt_ids) - 1
        sampler[i, st: st + len(s.logprobs)] = torch.tensor(s.logprobs)
    d = {"tokens": tokens, "mask": mask, "valid": valid, "sampler": sampler}
    if ref is not None:
        d["ref"] = ref
        if ac.name == "rloo":
            rr = A.kl_penalized_rewards(rewards[order], sampler[: len(order)], ref[: len(order)],
                                        mask[: len(order)], ac.kl_coef)
            adv = A.rloo_advantages(rr.view(-1, k)).reshape(-1)
        elif ac.name == "ppo":
            adv = A.group_advantages(r).reshape(-1)[order]
        else:
            adv = torch.zeros(len(order))
        d["adv"] = torch.cat([adv, torch.zeros(tokens.shape[0] - len(order))])

    def loss_fn(lp, b):
        v = b["valid"]
        if not v.any():
            return lp.sum() * 0.0, {}
        lp, m, rf = lp[v] * b["mask"][v], b["mask"][v], b["ref"][v]
        if ac.name == "online_dpo":
            seq, ref_seq = lp.sum(-1), (rf * m).sum(-1)
            loss, mm = A.online_dpo_loss(seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], ac.beta, ac.loss_type)
        elif ac.name == "rloo":
            loss, mm = A.rloo_loss(lp, b["adv"][v], m)
        else:
            loss, mm = A.ppo_clip_loss(lp, None, b["sampler"][v], b["adv"][v], m, ac.clip_eps, ac.tis_cap)
        return loss, {**mm, "loss": loss.detach()}

    out = train_step(ddp, opt, _split(d, micro), loss_fn, vocab_size, ac.temperature)
    if "loss" in out and not math.isfinite(out["loss"]) or not math.isfinite(out.get("grad_norm", 0.0)):
        raise NonFiniteLoss(f"non-finite loss/grad norm at this step ({out}); stopping. The last exported policy on "
                            "disk is the last good state.")
    return {**metrics, **out}
