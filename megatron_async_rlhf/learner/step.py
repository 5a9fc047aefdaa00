"""One learner step on a batch of samples: micro-batches, reference log-probs, the algorithm's loss, the update.

Glue between the run's loop (modes/rl.py) and the algorithms (algorithms/: rows, advantages, loss units, loss). Every learner rank calls these together;
reference log-probs and the loss live on the last pipeline stage.

Micro-batches (:func:`plan_micro_batches`) come in two kinds: by row count (``algorithm.micro_batch`` rows at most,
rows spread evenly, batch order kept) or by token budget (``learner.max_tokens_per_micro_batch``: rows sorted by
length and packed so rows x longest row stays within the budget). Either way each micro-batch is padded only to its
own longest row, and no padding rows are added. The loss of a micro-batch is weighted by its share of the batch's loss
units (DPO pairs, RLOO samples, PPO / SFT completion tokens), so the step's loss and gradient are those of the whole
batch in one padded pass, whatever the split.

``rl_step`` takes ``algorithm.updates_per_batch`` optimizer steps on its mini-batch (PPO's ratio then against the
log-probs before the first); an algorithm with a critic gets its value model's old values and value step from
``learner/critic.py``.

Data parallelism: each learner DP replica trains its own share of every batch (:func:`replica_share`: a contiguous
block of an RL mini-batch's prompts, all k samples of a prompt on one replica, so group baselines and DPO pairs are
computed as on one replica; a block of an SFT batch's rows). Rows are picked, and rewards and advantages known, for
the whole batch on every rank; the reference, policy and critic forwards run on the replica's rows only. The loss is
normalised by the loss units of ALL replicas (all-reduced), and each replica's loss is scaled by ``dp`` because
megatron-core's DDP averages gradients over the replicas: DP=n gives the DP=1 gradient. Logged metrics are reduced
over the replicas the same way (unit-weighted means, sums), so a run's numbers do not depend on ``learner_dp``;
with one replica nothing is reduced and the numbers are bit for bit those of a single-replica step.
"""

from __future__ import annotations

import math

import torch

from megatron_async_rlhf.algorithms import build_algorithm
from megatron_async_rlhf.learner.forward import forward_collect, pad_batch
from megatron_async_rlhf.learner.train import from_last_stage, set_lr, train_step


class NonFiniteLoss(RuntimeError):
    pass


def micro_size(n: int, micro: int, multiple: int = 1) -> int:
    """Rows per micro-batch for ``n`` rows and a cap of ``micro``: as few micro-batches as the cap allows, rows spread
    evenly over them (a multiple of ``multiple``: 2 keeps DPO pairs together). A batch of 4 pairs with ``micro=16``
    trains one micro-batch of 8 rows, not 16."""
    cap = max(multiple, micro - micro % multiple)
    count = -(-n // cap)
    size = -(-n // count)
    return -(-size // multiple) * multiple


def plan_micro_batches(lengths: list[int], group: int = 1, max_rows: int = 16, max_tokens: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch. Rows come in units of ``group`` consecutive rows (2: a DPO pair, chosen then
    rejected) that are never split.

    ``max_tokens == 0``: at most ``max_rows`` rows per micro-batch, as few micro-batches as that allows, batch order
    kept. ``max_tokens > 0``: units sorted longest first and packed greedily while rows x longest row <= max_tokens
    (``max_rows`` is not used); a unit longer than the budget on its own gets a micro-batch of its own."""
    n = len(lengths)
    if n % group:
        raise ValueError(f"{n} rows do not form units of {group}")
    if max_tokens <= 0:
        size = micro_size(n, max_rows, group)
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    units = [list(range(u, u + group)) for u in range(0, n, group)]
    width_of = [max(lengths[i] for i in u) for u in units]
    plans: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for u in sorted(range(len(units)), key=lambda u: -width_of[u]):  # stable: equal lengths keep batch order
        if cur and (len(cur) + group) * max(width, width_of[u]) > max_tokens:
            plans.append(cur)
            cur, width = [], 0
        cur.extend(units[u])
        width = max(width, width_of[u])
    if cur:
        plans.append(cur)
    return plans


def pad_fraction(micro_batches: list[dict]) -> float:
    """Share of the token positions the model computes that are padding."""
    total = sum(m["tokens"].numel() for m in micro_batches)
    real = sum(int(m["length"].sum()) for m in micro_batches)
    return 1.0 - real / total


def build_micro_batches(seqs: list[list[int]], starts: list[int], plan: list[list[int]]) -> list[dict]:
    """Per micro-batch: ``tokens [b, s]`` right-padded to its longest row, ``mask [b, s-1]`` (1 on positions that
    predict a completion token), ``rows`` (indices into the batch) and ``length [b]``."""
    out = []
    for idx in plan:
        tokens = pad_batch([seqs[i] for i in idx], len(idx))
        mask = torch.zeros(len(idx), tokens.shape[1] - 1)
        for r, i in enumerate(idx):
            mask[r, starts[i] - 1: len(seqs[i]) - 1] = 1.0
        out.append({"tokens": tokens, "mask": mask, "rows": torch.tensor(idx),
                    "length": torch.tensor([len(seqs[i]) for i in idx])})
    return out


def replica_share(n: int, dp: int, dp_rank: int) -> range:
    """Which of ``n`` units (an RL mini-batch's prompts, an SFT batch's rows) data-parallel replica ``dp_rank`` of
    ``dp`` trains: a contiguous block, block sizes differing by at most one. The schedule deals rows out with it and
    the learner step picks its rows with it."""
    if n < dp:
        raise ValueError(f"a batch of {n} prompts/rows cannot give each of {dp} data-parallel replicas one; use at "
                         f"least cluster.learner_dp={dp} per batch")
    return range(n * dp_rank // dp, n * (dp_rank + 1) // dp)


def data_parallel() -> tuple[int, int]:
    """(replicas, this rank's replica) of the learner's data parallelism."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def dp_sum(values: torch.Tensor, op=None) -> torch.Tensor:
    """``values`` summed (or reduced by ``op``, a ``ReduceOp``) over the data-parallel replicas (every rank of a
    replica holds its replica's numbers), in float64, on ``values``' device; ``values`` itself with one replica."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return values
    # NCCL reduces device tensors only; gloo CPU ones
    t = values.detach().to(device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float64)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM, group=ps.get_data_parallel_group())
    return t.to(values.device)


def _global_metrics(out: dict, local: float, total: float, micro_batches: list[dict], keep: tuple = (),
                    sums: dict | None = None) -> dict:
    """``out`` over all data-parallel replicas, in one all-reduce: its per-replica means as unit-weighted means
    (``local`` of ``total`` loss units here), ``keep``: keys already global (grad norms), ``sums``: numbers summed
    over the replicas, and ``pad_fraction`` / ``micro_batches`` of all replicas' micro-batches."""
    sums = sums or {}
    keys = [k for k in sorted(out) if k not in keep and isinstance(out[k], float) and not k.endswith("_max")]
    maxes = [k for k in sorted(out) if k not in keep and isinstance(out[k], float) and k.endswith("_max")]
    if maxes:  # a ``*_max`` metric is the batch's maximum (learner/train.py takes it over the micro-batches)
        out = {**out, **dict(zip(maxes, dp_sum(torch.tensor([out[k] for k in maxes], dtype=torch.float64),
                                               torch.distributed.ReduceOp.MAX).tolist()))}
    real = sum(int(m["length"].sum()) for m in micro_batches)
    tokens = sum(m["tokens"].numel() for m in micro_batches)
    values = [out[k] * local for k in keys] + list(sums.values()) + [real, tokens, len(micro_batches)]
    reduced = dp_sum(torch.tensor(values, dtype=torch.float64)).tolist()
    means, summed, (real, tokens, n) = reduced[:len(keys)], reduced[len(keys):-3], reduced[-3:]
    return {**out, **{k: v / total if total else v for k, v in zip(keys, means)}, **dict(zip(sums, summed)),
            "pad_fraction": 1.0 - real / tokens, "micro_batches": int(n)}


def _loss_scale(units: list[float]) -> tuple[float, float, float]:
    """(this replica's loss units, all replicas', the factor on this replica's unit-weighted loss): ``dp x local /
    total`` because megatron-core's DDP averages the replicas' gradients; 1 with one replica."""
    dp, _ = data_parallel()
    local = sum(units)
    if dp == 1:
        return local, local, 1.0
    total = float(dp_sum(torch.tensor([local], dtype=torch.float64))[0])
    return local, total, dp * local / total if total else 1.0


def _weigh(micro_batches: list[dict], units: list[float]) -> None:
    """``weight`` = the micro-batch's share of the batch's loss units (train_step scales its loss by it)."""
    total = sum(units)
    for m, u in zip(micro_batches, units):
        m["weight"] = u / total if total else 1.0 / len(micro_batches)


def sft_step(ddp, opt, prompts: list[list[int]], answers: list[list[int]], vocab_size: int, micro: int,
             max_tokens: int = 0) -> dict:
    """Supervised step on this data-parallel replica's rows: mean NLL of the answer tokens given the prompt, over
    all answer tokens of all replicas' rows. Loss and pad fraction are those of the whole batch, on every rank."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    mbs = build_micro_batches(seqs, [len(p) for p in prompts], plan_micro_batches([len(s) for s in seqs], 1, micro,
                                                                               max_tokens))
    units = [float(m["mask"].sum()) for m in mbs]
    _weigh(mbs, units)
    local, total, scale = _loss_scale(units)

    def loss_fn(lp, b):
        loss = -(lp * b["mask"]).sum() / b["mask"].sum().clamp(min=1)
        return loss * scale if scale != 1.0 else loss, {"loss": loss.detach()}

    out = train_step(ddp, opt, mbs, loss_fn, vocab_size)
    if data_parallel()[0] > 1:
        out = _global_metrics(out, local, total, mbs, keep=("grad_norm",))
        del out["micro_batches"]
        return out
    return {**out, "pad_fraction": pad_fraction(mbs)}


def reference_logprobs(ref_model, micro_batches: list[dict], vocab_size: int, temperature: float,
                       key: str = "ref") -> None:
    """``ref [b, s-1]`` (or ``key``) into each micro-batch, on the last pipeline stage (all learner ranks call it)."""
    from megatron_async_rlhf.learner.logprobs import vocab_parallel_logprobs

    ref_model.eval()
    toks = [m["tokens"] for m in micro_batches]
    outs = forward_collect(ref_model, toks, lambda logits, i: vocab_parallel_logprobs(
        logits[:, :-1], toks[i][:, 1:], vocab_size, temperature))
    for m, lp in zip(micro_batches, outs):
        m[key] = lp


def policy_logprobs(ddp, micro_batches: list[dict], vocab_size: int, temperature: float) -> None:
    """``old [b, s-1]``: the policy's log-probs before this batch's first update (PPO's ratio with several updates)."""
    reference_logprobs(ddp, micro_batches, vocab_size, temperature, key="old")


def rl_step(batch, rewards: torch.Tensor, ac, ddp, opt, ref_model, vocab_size: int, max_tokens: int = 0,
            critic=None) -> dict:
    """``ac.updates_per_batch`` RL updates on ``batch.samples`` (prompt-major, k per prompt) with scalar
    ``rewards [N]``, by the algorithm ``ac.name`` (``algorithms/``: its rows, advantages, loss units and loss;
    ``ac`` is the ``algorithm`` config). ``max_tokens``: the micro-batch token budget (0: ``ac.micro_batch`` rows per
    micro-batch). ``critic``: the value model (``learner/critic.py``) of an algorithm that uses one.

    Each data-parallel replica trains the rows of its prompts (:func:`replica_share`); ``batch.samples`` needs to
    hold only those (the others may be None), ``rewards`` every sample's. Metrics are the whole batch's."""
    algo = build_algorithm(ac)
    k = ac.samples_per_prompt
    samples = batch.samples
    dp, dp_rank = data_parallel()
    mine = replica_share(rewards.numel() // k, dp, dp_rank)  # this replica's prompts
    if ac.lr_schedule == "linear":  # batch.index: the optimizer step this mini-batch is trained at
        set_lr(opt, ac.lr, "linear", batch.index, ac.steps)
    metrics: dict = {"reward_mean": rewards.mean().item()}
    order, m_rows = algo.rows(rewards.view(-1, k))  # row j of the batch is samples[order[j]]
    metrics.update(m_rows)
    if not order:
        return {**metrics, "skipped": 1.0}  # e.g. every prompt tied: no preference to learn from
    n_rows = len(order)
    order = [i for i in order if i // k in mine]  # whole prompts: a unit (a DPO pair) never straddles replicas
    live = bool(order)
    if not live:  # every row of this replica's prompts dropped (all tied): a stand-in with an empty loss mask joins
        # the step's collectives and adds nothing (no gradient, no loss units, no statistics)
        order = list(range(mine.start * k, mine.start * k + k - k % algo.rows_per_unit))
    picked = [samples[i] for i in order]
    seqs = [s.prompt_ids + s.token_ids for s in picked]
    starts = [len(s.prompt_ids) for s in picked]
    mbs = build_micro_batches(seqs, starts, plan_micro_batches([len(s) for s in seqs], algo.rows_per_unit,
                                                               ac.micro_batch, max_tokens))
    for m in mbs:
        m["sampler"] = torch.zeros_like(m["mask"])
        for j, i in enumerate(m["rows"].tolist()):
            lp = picked[i].logprobs
            m["sampler"][j, starts[i] - 1: starts[i] - 1 + len(lp)] = torch.tensor(lp)
        if not live:
            m["mask"].zero_()
    reference_logprobs(ref_model, mbs, vocab_size, ac.temperature)
    if algo.needs_old_logprobs():
        policy_logprobs(ddp, mbs, vocab_size, ac.temperature)
    if critic is not None:
        critic.old_values(mbs)
    algo.dp_sum = dp_sum if dp > 1 else None  # batch-wide statistics (advantage whitening) over all replicas
    if "ref" in mbs[0]:  # the last pipeline stage: advantages need every row's numbers
        metrics.update(algo.advantages(mbs, rewards, order))
        # KL(sampler || reference) per sequence, estimated on the sampled tokens: how far the policy has moved
        metrics["kl_ref"] = sum(float(((m["sampler"] - m["ref"]) * m["mask"]).sum()) for m in mbs) / n_rows
    units = [algo.units(m) if live else 0.0 for m in mbs]
    _weigh(mbs, units)
    local, total, scale = _loss_scale(units)

    def loss_fn(lp, b):
        loss, mm = algo.loss(lp * b["mask"], b)
        return loss * scale if scale != 1.0 else loss, {**mm, "loss": loss.detach()}

    for _ in range(ac.updates_per_batch):
        out = train_step(ddp, opt, mbs, loss_fn, vocab_size, ac.temperature)
        if critic is not None:
            out.update(critic.step(mbs, algo.value_loss, scale))
    metrics = from_last_stage(metrics)
    if dp > 1:
        out = _global_metrics(out, local, total, mbs, keep=("grad_norm", "critic_grad_norm"),
                              sums={"kl_ref": metrics.pop("kl_ref")})
    else:
        out.update(pad_fraction=pad_fraction(mbs), micro_batches=len(mbs))
    out = algo.batch_metrics(out)  # what the algorithm derives from the batch's means (an effective sample size)
    if "loss" in out and not math.isfinite(out["loss"]) or not math.isfinite(out.get("grad_norm", 0.0)):
        raise NonFiniteLoss(f"non-finite loss/grad norm at this step ({out}); stopping. The last exported policy on "
                            "disk is the last good state.")
    return {**metrics, **out, "optimizer_steps": ac.updates_per_batch}
