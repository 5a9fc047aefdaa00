"""mode=sft: supervised fine-tuning on (prompt, answer) rows, learner ranks only; also RL's warm start.

    python -m megatron_async_rlhf mode=sft sft.steps=200

    learner ranks only -> prompts and gold answers (data/tasks.py) -> sft.steps x sft_step (learner/step.py)
    -> <logging.out_dir>/policy/final (HF safetensors + tokenizer)

No rollout engine is started (``cluster.rollout_*`` are ignored). ``mode=rl`` with ``sft.steps > 0`` runs the same
:func:`warm_start` first, with the same numbers.
"""

from __future__ import annotations

from megatron_async_rlhf.config import RunConfig
from megatron_async_rlhf.modes.common import Policy, PromptData, export_policy, join_launch, launch, open_metrics

def main(cfg: RunConfig, model_path: str) -> int:
    launch(cfg, job, model_path, "sft", learners_only=True)
    return 0


def job(cfg_dict: dict, model_path: str, session: str = "sft", world_size: int | None = None) -> dict | None:
    cfg, ctx = join_launch(cfg_dict, session, world_size)
    if ctx is None:
        return None
    data = PromptData(cfg, model_path)
    metrics = open_metrics(cfg, ctx, cfg.sft.steps)
    try:
        policy = Policy.from_hf(cfg, model_path)
        warm_start(cfg, data, policy, metrics)
        export_policy(cfg, ctx, policy, model_path, "final")
    finally:
        if metrics:
            metrics.close()
    return {"mode": "sft", "steps": cfg.sft.steps} if ctx.is_controller else None


def warm_start(cfg: RunConfig, data: PromptData, policy: Policy, metrics) -> None:
    """``sft.steps`` supervised steps on batches of training rows drawn with ``data.rng``: the prompt, then the gold
    answer and the model's first stop token as the target. Every rank draws the same ``sft.batch_size`` rows; each
    data-parallel replica trains its share of them (``learner.step.replica_share``), the loss normalised over the
    whole batch."""
    from megatron_async_rlhf.learner.step import data_parallel, replica_share, sft_step

    sc, tok = cfg.sft, data.tok
    eos = data.stops[0] if data.stops else tok.eos_token_id
    dp, dp_rank = data_parallel()
    mine = replica_share(sc.batch_size, dp, dp_rank) if sc.steps else None
    for step in range(sc.steps):
        idx = [data.rng.randrange(len(data.train_rows)) for _ in range(sc.batch_size)][mine.start:mine.stop]
        answers = [tok(" " + data.train_rows[i].answer, add_special_tokens=False)["input_ids"] + [eos] for i in idx]
        out = sft_step(policy.ddp, policy.opt, [data.train_ids[i] for i in idx], answers, policy.mcfg.vocab_size,
                       sc.batch_size, cfg.learner.max_tokens_per_micro_batch)
        if metrics and (step % 10 == 0 or step == sc.steps - 1):
            metrics.log(step, "sft", **{k: v for k, v in out.items() if isinstance(v, float)})
