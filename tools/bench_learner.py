#!/usr/bin/env python
"""Benchmark: one RL learner step on one CPU core, Megatron learner in fp32 and in bf16 (learner.precision), and the
same step in plain transformers + torch.optim.AdamW (fp32) as a reference. A script, not a test: run it on demand.

    python tools/bench_learner.py [--hf DIR] [--batch 64] [--samples 2] [--prompt-len 24] [--completion-len 64]

One step is what the RL loop (``modes/rl.py``) runs per step (``learner.step.rl_step``, online DPO): the reference
model's forward over every row, the policy's forward + backward in micro-batches, gradient clipping, one Adam step.
Rows are ``batch`` prompts x ``samples`` completions of random tokens (every prompt yields a pair). Without ``--hf``
it builds the issue's reference shape: LLaMA hidden 512, intermediate 1376, 6 layers, 4 heads / 2 KV groups (head_dim
128), vocab 512. One process, one thread, pinned to one core; the median of ``--repeats`` steps after ``--warmup``,
the three variants interleaved step by step.
The last line is ``step_s_fp32=... step_s_bf16=... speedup_bf16=... hf_step_s_fp32=... ratio_vs_hf=...``
(``ratio_vs_hf`` = Megatron fp32 step / transformers fp32 step).

Data parallelism: ``--dp 1,2`` instead times the Megatron fp32 step (``--algorithm``) on the same global batch with
``learner_dp`` = 1 and 2 learner processes (one core each, pinned to the allowed cores in turn), each replica training
its share (``learner.step.replica_share``), the settings interleaved step by step. The last line is
``dp1_step_s=... dp2_step_s=... ratio_dp2_dp1=...``.

    python tools/bench_learner.py --dp 1,2 --algorithm rloo --batch 32
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

REFERENCE_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=128, vocab_size=512)


def make_rows(vocab: int, batch: int, samples: int, prompt_len: int, completion_len: int, seed: int = 0):
    """``batch * samples`` fake samples (prompt-major) and rewards giving every prompt a chosen/rejected pair."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for _ in range(samples):
            out.append(SimpleNamespace(prompt_ids=prompt,
                                       token_ids=torch.randint(0, vocab, (completion_len,), generator=g).tolist(),
                                       logprobs=[-1.0] * completion_len))
    rewards = torch.tensor([float(i % samples == 0) for i in range(len(out))])
    return SimpleNamespace(samples=out, index=0), rewards


def megatron_step(hf_dir: str, dtype: torch.dtype, batch, rewards, ac):
    """A callable running one RL step on a Megatron learner (policy + reference) built as an RL run builds it."""
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.model import build_model
    from megatron_async_rlhf.learner.step import rl_step
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training

    cfg, model, info = model_from_hf(hf_dir, 1, 1, dtype=dtype)  # as an RL run builds them (modes/common.Policy)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=ac.lr, clip_grad=ac.clip_grad))
    ref, _ = build_model(cfg, dtype=dtype, init=False)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    return lambda: rl_step(batch, rewards, ac, ddp, opt, ref, cfg.vocab_size)


_DP_STEP = None  # a data-parallel worker's step (``--dp``), built by _dp_setup


def _dp_setup(hf_dir: str, args: dict) -> int:
    """In a ``--dp`` worker (one of ``dp`` learner processes): pin to a core, build the learner at TP1 x PP1 (so DP =
    the processes), keep the step. Returns the core."""
    global _DP_STEP
    import torch.distributed as dist

    from megatron_async_rlhf.config import AlgorithmConfig
    from megatron_async_rlhf.learner.parallel import init_learner_parallel
    from megatron_async_rlhf.weights.llama_config import read_config

    cores = sorted(os.sched_getaffinity(0))
    core = cores[dist.get_rank() % len(cores)]
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    init_learner_parallel(1, 1)
    cfg = read_config(hf_dir)
    ac = AlgorithmConfig(name=args["algorithm"], samples_per_prompt=args["samples"], micro_batch=args["micro_batch"],
                         lr=1e-5)
    batch, rewards = make_rows(cfg.vocab_size, args["batch"], args["samples"], args["prompt_len"],
                               args["completion_len"])
    _DP_STEP = megatron_step(hf_dir, torch.float32, batch, rewards, ac)
    return core


def _dp_step() -> float:
    """One step on this worker's replica; its seconds."""
    t0 = time.perf_counter()
    _DP_STEP()
    return time.perf_counter() - t0


def bench_dp(hf_dir: str, dps: list[int], args) -> None:
    """Step time at each learner data-parallel size in ``dps`` on the same global batch (see the module doc)."""
    from megatron_async_rlhf.launch import WorkerGroup

    settings = {k: getattr(args, k) for k in ("algorithm", "batch", "samples", "micro_batch", "prompt_len",
                                              "completion_len")}
    groups = {dp: WorkerGroup(dp, threads_per_rank=1, timeout_s=1800) for dp in dps}
    try:
        for dp, g in groups.items():
            print(f"dp{dp}: cores {g.run(_dp_setup, hf_dir, settings)}", flush=True)
        for _ in range(args.warmup):
            for g in groups.values():
                g.run(_dp_step)
        times: dict[int, list[float]] = {dp: [] for dp in dps}
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every setting alike
            for dp, g in groups.items():
                times[dp].append(max(g.run(_dp_step)))  # a step ends when its slowest replica does
    finally:
        for g in groups.values():
            g.close()
    res = {dp: statistics.median(v) for dp, v in times.items()}
    for dp, v in times.items():
        print(f"dp{dp} step s: median {res[dp]:.3f} ({', '.join(f'{t:.3f}' for t in v)})", flush=True)
    line = " ".join(f"dp{dp}_step_s={res[dp]:.3f}" for dp in dps)
    print(line + "".join(f" ratio_dp{dp}_dp{dps[0]}={res[dp] / res[dps[0]]:.2f}" for dp in dps[1:]))


def hf_step(hf_dir: str, batch, ac):
    """A callable running the same step in plain transformers: reference forward, policy forward + backward per
    micro-batch (gradient accumulation), clip, AdamW. Log-probs by log_softmax + gather in fp32; the same online DPO
    loss."""
    from transformers import LlamaForCausalLM

    from megatron_async_rlhf.algorithms import online_dpo_loss

    policy = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=ac.lr, betas=(0.9, 0.95), weight_decay=0.0)
    seqs = [s.prompt_ids + s.token_ids for s in batch.samples]
    tokens = torch.tensor(seqs)  # [R, S]: equal lengths, no padding
    start = len(batch.samples[0].prompt_ids) - 1
    micro = [tokens[i:i + ac.micro_batch] for i in range(0, len(seqs), ac.micro_batch)]

    def logprobs(model, t):  # [b, S-1]
        logits = model(input_ids=t).logits[:, :-1].float()
        return torch.log_softmax(logits / ac.temperature, -1).gather(-1, t[:, 1:, None])[..., 0]

    def step():
        with torch.no_grad():
            ref_seq = [logprobs(ref, t)[:, start:].sum(-1) for t in micro]  # [b] each
        policy.train()
        opt.zero_grad(set_to_none=True)
        for t, r in zip(micro, ref_seq):
            seq = logprobs(policy, t)[:, start:].sum(-1)
            loss, _ = online_dpo_loss(seq[0::2], seq[1::2], r[0::2], r[1::2], ac.online_dpo.beta, ac.online_dpo.loss_type)
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), ac.clip_grad)
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", help="HF LLaMA directory (default: the reference shape, made once under --work)")
    ap.add_argument("--work", default="runs/bench_learner")
    ap.add_argument("--batch", type=int, default=64, help="prompts per step")
    ap.add_argument("--samples", type=int, default=2, help="completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the first allowed one)")
    ap.add_argument("--dp", default="", help="comma-separated learner data-parallel sizes to compare (e.g. 1,2), one "
                                             "process and core per replica; the global batch stays --batch prompts")
    ap.add_argument("--algorithm", default="online_dpo", help="the step's algorithm (with --dp)")
    args = ap.parse_args()

    hf_dir = args.hf
    if hf_dir is None:
        from megatron_async_rlhf.models.tiny import make_tiny_llama

        hf_dir = os.path.join(args.work, "reference-shape")
        if not os.path.exists(os.path.join(hf_dir, "config.json")):
            make_tiny_llama(hf_dir, "tiny-gqa", **REFERENCE_SHAPE)
    if args.dp:
        return bench_dp(hf_dir, [int(d) for d in args.dp.split(",")], args)
    core = args.core if args.core is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)

    import torch.distributed as dist

    from megatron_async_rlhf.config import AlgorithmConfig
    from megatron_async_rlhf.weights.llama_config import read_config
    from megatron_async_rlhf.launch import free_port
    from megatron_async_rlhf.learner.parallel import init_learner_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_learner_parallel(1, 1)
    cfg = read_config(hf_dir)
    ac = AlgorithmConfig(name="online_dpo", samples_per_prompt=args.samples, micro_batch=args.micro_batch, lr=1e-5)
    batch, rewards = make_rows(cfg.vocab_size, args.batch, args.samples, args.prompt_len, args.completion_len)
    print(f"model {hf_dir}: hidden {cfg.dims.hidden_size}, layers {cfg.dims.num_layers}, vocab {cfg.vocab_size}; "
          f"{len(batch.samples)} rows x {args.prompt_len + args.completion_len} tokens, micro-batch "
          f"{args.micro_batch}, core {core}, 1 thread", flush=True)
    steps = {"fp32": megatron_step(hf_dir, torch.float32, batch, rewards, ac),
             "bf16": megatron_step(hf_dir, torch.bfloat16, batch, rewards, ac),
             "hf_fp32": hf_step(hf_dir, batch, ac)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every variant alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    res = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:8s} step s: median {res[k]:.3f} ({', '.join(f'{t:.3f}' for t in v)})", flush=True)
    dist.destroy_process_group()
    print(f"step_s_fp32={res['fp32']:.3f} step_s_bf16={res['bf16']:.3f} "
          f"speedup_bf16={res['fp32'] / res['bf16']:.2f} hf_step_s_fp32={res['hf_fp32']:.3f} "
          f"ratio_vs_hf={res['fp32'] / res['hf_fp32']:.2f}")


if __name__ == "__main__":
    main()
