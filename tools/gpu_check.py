#!/usr/bin/env python
"""The learner's CUDA half, checked in one command on one GPU (or, with ``--device cpu --small``, on the CPU in CI).

    python tools/gpu_check.py                         # one GPU, the Rho-1B shape, random weights made there
    python tools/gpu_check.py --device cpu --small    # a tiny shape on the CPU (gloo): what CI runs

Every check runs the project's own code on weights made in this process (a random LLaMA, saved as an HF directory
under ``--work``): ``learner.build.model_from_hf``, ``checks.parity``, ``learner.step.rl_step``,
``learner.checkpoint``, ``weights.gather`` + ``weights.sync``. One process, megatron's parallel state at TP1 x PP1
over a one-rank group (NCCL on a GPU, gloo on the CPU).

- ``parity_fp32``: Megatron logits / log-probs vs transformers' ``LlamaForCausalLM`` in fp32 on the same device,
  TF32 off. Tolerance ``checks.parity``'s: ``max(2e-5 * max|logit|, 4 * fp32_floor)`` (fp32_floor: transformers'
  fp32 vs its own fp64 forward); log-probs twice that.
- ``parity_bf16``: the bf16 learner vs transformers' fp32 logits. Tolerance ``max(2e-5 * max|logit|, 4 *
  bf16_floor)``, bf16_floor = how far transformers' own bf16 forward lands from its fp32 one: the learner's bf16 must
  be about as close to fp32 as transformers' bf16 is.
- ``rl_step_bf16``: ``rl_step`` (online DPO: reference forward, policy forward + backward, clip, Adam) in bf16 with
  fp32 main weights; passes when every step's loss and grad norm are finite, the update is applied, the weights
  moved and they are bf16 on the device. Reports tokens/s (every row's tokens, per step), MFU (``6 * params *
  tokens/s / peak bf16 dense FLOP/s``: the policy's training FLOPs only, the reference forward not counted; H100/H200
  989e12, A100 312e12, else ``--peak-tflops``) and ``torch.cuda.max_memory_allocated``.
- ``hf_step_bf16``: the same step in plain transformers + ``torch.optim.AdamW`` (fp32 weights under bf16 autocast, a
  bf16 reference model), for comparison; passes when finite.
- ``checkpoint``: ``checkpoint.save_model`` of the trained policy with its optimizer, ``load_model`` into a freshly
  built policy + optimizer; passes when every weight, fp32 main weight and Adam moment is restored bit-exactly.
- ``weight_sync_gather``: the weight sync's learner side on one rank: the fp32 learner staged for a bf16 engine
  (``weights.sync.wire_dtype``), ``gather.stage_hf_groups`` -> ``sync.send_stage`` (buckets packed in reusable
  buffers on the device) into a loopback bridge, unpacked; passes when every HF tensor arrives once, bit-equal to
  the checkpoint's tensor rounded to bf16, fused groups never split, and the bytes are 2 per parameter.

The learner takes Transformer Engine's layer spec where TE imports and CUDA is there (``te_spec=True`` on the
``device=`` line); ``--no-te`` forces megatron-core's local spec (what the CPU tests cover) to tell a TE-path failure
from a general one.

Output: a ``device=...`` line, then one line per check ``<name>=PASS|FAIL key=value ...`` (a crash in a check is
that check's FAIL with ``error=...``; the others still run), then ``gpu_check=PASS|FAIL passed=<n>/<m>
seconds=<s>``. Exit status 1 when any check fails.

On a GPU machine without a package registry (an NGC-like PyTorch image: torch and numpy, no megatron-core or
transformers), bring the wheels: ``bash tools/gpu_wheels.sh 3.12`` here (the image's Python; ~22 MB into the
git-ignored .gpu/wheels), then in one device call that carries .gpu/wheels:
    pip install -q --no-index --no-deps .gpu/wheels/*.whl && python tools/gpu_check.py
Seen passing with --device cpu --small from a bare checkout in a venv of only torch + numpy + those wheels:
Python 3.11 / torch 2.13 / megatron-core 0.16.1, and Python 3.12 / torch 2.9.1 / megatron-core 0.19.2.
"""

import os

# NGC images set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which makes every fp32 matmul TF32 (10-bit mantissa) whatever
# torch.backends says: fp32 parity would compare TF32 against TF32. Off before torch initialises cuBLAS.
os.environ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "0"
os.environ["NVIDIA_TF32_OVERRIDE"] = "0"

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from bench_learner import make_rows  # noqa: E402  (tools/ is on sys.path: the one fake batch maker)

# run from a bare checkout (a GPU machine where the package is not installed): the repository root on the path
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Rho-1B (TinyLlama's shape): 1.1B parameters
RHO_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256)
# what each run feeds the checks: parity batches [batch, seq] x num; RL rows = prompts x 2 samples of
# prompt + completion tokens, micro-batches of micro rows; timed steps after one warm-up
FULL_RUN = dict(parity_batch=2, parity_seq=256, parity_num=2, prompts=32, prompt_len=64, completion_len=448,
                micro=8, steps=3, bucket_mb=256.0)
SMALL_RUN = dict(parity_batch=2, parity_seq=32, parity_num=2, prompts=4, prompt_len=8, completion_len=24,
                 micro=4, steps=2, bucket_mb=0.02)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU


class Checks:
    """Runs checks in order, printing one line each; a check that raises is a FAIL, and the rest still run."""

    def __init__(self):
        self.results: dict[str, bool] = {}

    def run(self, name: str, fn, *args):
        t0 = time.perf_counter()
        try:
            ok, fields = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported as this check's failure
            traceback.print_exc(file=sys.stderr)
            ok, fields = False, {"error": f"{type(e).__name__}: {e}".replace("\n", " ")[:300]}
        fields["seconds"] = f"{time.perf_counter() - t0:.1f}"
        self.results[name] = ok
        print(f"{name}={'PASS' if ok else 'FAIL'} " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
        free_memory()
        return ok


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(x: float) -> str:
    return f"{x:.3e}"


# ----- the model ------------------------------------------------------------------------------------------------

def make_hf_model(out_dir: str, shape: dict, device: torch.device, seed: int = 0) -> str:
    """A random LlamaForCausalLM of ``shape`` made on ``device`` and saved (fp32 safetensors) to ``out_dir``. Norm
    weights drawn from U(0.5, 1.5), so a swapped or missing norm shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    free_memory()
    return out_dir


# ----- checks -----------------------------------------------------------------------------------------------------

def check_parity(hf_dir: str, run: dict, device: torch.device, dtype: torch.dtype):
    """Megatron at TP1 (``model_from_hf``) vs transformers on the same device, through ``checks.parity``."""
    from megatron_async_rlhf.checks.jobs import logits_and_logprobs
    from megatron_async_rlhf.checks.parity import compare, fp32_floor, hf_reference, random_batches
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.weights.llama_config import read_config

    cfg = read_config(hf_dir)
    batches = random_batches(cfg.vocab_size, run["parity_batch"], run["parity_seq"], run["parity_num"], seed=1)
    ref = hf_reference(hf_dir, batches, dtype=torch.float32, device=device)
    free_memory()
    # the floor: how far transformers' own forward in the lower precision lands from the higher one
    other = hf_reference(hf_dir, batches, dtype=torch.float64 if dtype == torch.float32 else dtype, device=device)
    floor = fp32_floor(ref, other)
    del other
    free_memory()
    cfg, model, info = model_from_hf(hf_dir, 1, 1, dtype=dtype)
    out = logits_and_logprobs(cfg, model, info, batches)  # back on the CPU, like the batches
    del model
    res = compare(out, ref, floor=floor)
    floor_name = "fp32_floor" if dtype == torch.float32 else "bf16_floor"
    return res.ok, {"max_abs_logit_diff": fmt(res.max_abs_logit_diff), "logit_tolerance": fmt(res.logit_tolerance),
                    "max_abs_logprob_diff": fmt(res.max_abs_logprob_diff),
                    "logprob_tolerance": fmt(res.logprob_tolerance), "logit_scale": fmt(res.logit_scale),
                    floor_name: fmt(floor), "tokens": sum(b.numel() for b in batches)}


class LoopbackBridge:
    """A one-rank stand-in for a sync bridge (``cluster.Channel``): keeps what ``send_stage`` broadcasts, copied off
    the sender's pack buffer (which is reused for the bucket after next)."""

    def __init__(self):
        self.buckets: list[tuple[list, torch.Tensor]] = []
        self._header = None

    def broadcast_obj(self, obj, root: int, what: str):
        self._header = obj
        return obj

    def broadcast(self, t: torch.Tensor, root: int, what: str, timeout_s=None, wait: bool = True):
        self.buckets.append((self._header, t.to("cpu", copy=True)))
        return t if wait else (lambda: t)


def check_weight_sync(hf_dir: str, run: dict, device: torch.device):
    """The sync's learner side at TP1: an fp32 learner staged for a bf16 engine, gathered, bucketed, packed, sent."""
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.weights.gather import stage_hf_groups
    from megatron_async_rlhf.weights.hf_io import HFCheckpoint
    from megatron_async_rlhf.weights.sync import PackBuffers, send_stage, unpack, wire_dtype

    cfg, model, info = model_from_hf(hf_dir, 1, 1, dtype=torch.float32)
    dtype = wire_dtype(torch.float32, torch.bfloat16)
    groups = []  # the names of each fused group, to check none is split between buckets

    def named():
        for g in stage_hf_groups(model, info, cfg, dtype, chunk_bytes=int(run["bucket_mb"] * 2**20)):
            groups.append([n for n, _ in g])
            yield g

    bridge, bucket_bytes = LoopbackBridge(), int(run["bucket_mb"] * 2**20)
    sync(device)
    t0 = time.perf_counter()
    sent = send_stage(bridge, named(), bucket_bytes, "weights", PackBuffers())
    sync(device)
    send_s = time.perf_counter() - t0
    got, bucket_of = {}, {}
    problems = []
    for i, (header, flat) in enumerate(bridge.buckets):
        for name, t in unpack(header, flat):
            if name in got:
                problems.append(f"{name} twice")
            got[name], bucket_of[name] = t, i
    ckpt = HFCheckpoint(hf_dir)
    expected = set(ckpt.shapes())
    if set(got) != expected:
        problems.append(f"names differ: missing {sorted(expected - set(got))[:3]}, "
                        f"extra {sorted(set(got) - expected)[:3]}")
    mismatched = [n for n in sorted(expected & set(got))
                  if got[n].dtype != dtype or not torch.equal(got[n], ckpt.get(n).to(dtype))]
    split = [g for g in groups if len({bucket_of.get(n) for n in g}) > 1]
    params = sum(math.prod(s) for s in ckpt.shapes().values())  # the HF tensors' elements (no vocab padding)
    if mismatched:
        problems.append(f"{len(mismatched)} tensors differ from the checkpoint's in {dtype}, e.g. {mismatched[:3]}")
    if split:
        problems.append(f"fused groups split between buckets: {split[:2]}")
    if sent != 2 * params:
        problems.append(f"{sent} bytes sent for {params} parameters (expected 2 per parameter)")
    fields = {"tensors": len(got), "buckets": len(bridge.buckets), "bytes": sent, "wire_dtype": str(dtype),
              "send_s": f"{send_s:.3f}"}
    if problems:
        fields["problems"] = "; ".join(problems).replace(" ", "_")[:300]
    return not problems, fields


def algorithm_config(micro: int):
    from megatron_async_rlhf.config import AlgorithmConfig

    return AlgorithmConfig(name="online_dpo", samples_per_prompt=2, micro_batch=micro, lr=1e-5)


def build_policy(hf_dir: str, dtype: torch.dtype, ac, from_hf: bool = True):
    """(cfg, model, info, ddp, optimizer) as an RL run builds its policy (``modes/common``)."""
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.model import build_model
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training
    from megatron_async_rlhf.weights.llama_config import read_config

    if from_hf:
        cfg, model, info = model_from_hf(hf_dir, 1, 1, dtype=dtype)
    else:
        cfg = read_config(hf_dir)
        model, info = build_model(cfg, dtype=dtype, init=False)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=ac.lr, clip_grad=ac.clip_grad))
    return cfg, model, info, ddp, opt


def step_stats(step_s: float, tokens: int, params: int, device: torch.device, peak_flops: float | None) -> dict:
    tps = tokens / step_s
    mfu = 6 * params * tps / peak_flops if peak_flops else float("nan")
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": f"{step_s:.3f}", "tokens_per_s": f"{tps:.0f}", "mfu": f"{mfu:.3f}",
            "peak_mem_gib": f"{mem:.2f}", "params": params, "tokens_per_step": tokens}


def reset_peak(device: torch.device) -> None:
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def check_rl_step(hf_dir: str, run: dict, device: torch.device, peak_flops: float | None, state: dict):
    """``rl_step`` in bf16: reference forward, policy forward + backward, clip, Adam; timed after one warm-up."""
    from megatron_async_rlhf.learner.model import build_model
    from megatron_async_rlhf.learner.step import rl_step

    ac = algorithm_config(run["micro"])
    reset_peak(device)
    cfg, model, info, ddp, opt = build_policy(hf_dir, torch.bfloat16, ac)
    ref, _ = build_model(cfg, dtype=torch.bfloat16, init=False)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    batch, rewards = make_rows(cfg.vocab_size, run["prompts"], 2, run["prompt_len"], run["completion_len"])
    outs, times = [], []
    for i in range(1 + run["steps"]):  # the first is the warm-up
        sync(device)
        t0 = time.perf_counter()
        outs.append(rl_step(batch, rewards, ac, ddp, opt, ref, cfg.vocab_size))
        sync(device)
        times.append(time.perf_counter() - t0)
    moved = max((p.detach().float() - b.float()).abs().max().item() for p, b in zip(model.parameters(), before))
    del before, ref
    finite = all(math.isfinite(o["loss"]) and math.isfinite(o["grad_norm"]) for o in outs)
    applied = all(o["update_ok"] for o in outs)
    placed = {(p.dtype, p.device) for p in model.parameters()} == {(torch.bfloat16, device)}
    params = sum(p.numel() for p in model.parameters())
    tokens = sum(len(s.prompt_ids) + len(s.token_ids) for s in batch.samples)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    state.update(cfg=cfg, model=model, info=info, ddp=ddp, opt=opt, ac=ac)  # for the checkpoint check
    fields = {"loss_first": f"{outs[0]['loss']:.4f}", "loss_last": f"{outs[-1]['loss']:.4f}",
              "grad_norm": f"{outs[-1]['grad_norm']:.3e}", "max_weight_change": fmt(moved),
              **step_stats(step_s, tokens, params, device, peak_flops)}
    if not placed:
        fields["problems"] = "weights_not_all_bf16_on_" + str(device)
    return finite and applied and placed and moved > 0, fields


def check_hf_step(hf_dir: str, run: dict, device: torch.device, peak_flops: float | None):
    """The same RL step in plain transformers + AdamW: fp32 weights under bf16 autocast (transformers' usual mixed
    precision), a bf16 reference model, micro-batch gradient accumulation, clip, AdamW; online DPO's loss."""
    from transformers import LlamaForCausalLM

    from megatron_async_rlhf.algorithms import online_dpo_loss

    ac = algorithm_config(run["micro"])
    reset_peak(device)
    policy = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    ref = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=ac.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batch, _ = make_rows(policy.config.vocab_size, run["prompts"], 2, run["prompt_len"], run["completion_len"])
    tokens = torch.tensor([s.prompt_ids + s.token_ids for s in batch.samples], device=device)  # [R, S]
    start = run["prompt_len"] - 1
    micro = list(tokens.split(ac.micro_batch))

    def logprobs(model, t):  # [b, S-1]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=t).logits[:, :-1]
        return torch.log_softmax(logits.float() / ac.temperature, -1).gather(-1, t[:, 1:, None])[..., 0]

    def step():
        with torch.no_grad():
            ref_seq = [logprobs(ref, t)[:, start:].sum(-1) for t in micro]  # [b] each
        policy.train()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for t, r in zip(micro, ref_seq):
            seq = logprobs(policy, t)[:, start:].sum(-1)
            loss, _ = online_dpo_loss(seq[0::2], seq[1::2], r[0::2], r[1::2], ac.online_dpo.beta,
                                      ac.online_dpo.loss_type)
            (loss / len(micro)).backward()
            total += float(loss.detach()) / len(micro)
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), ac.clip_grad)
        opt.step()
        return total, float(norm)

    outs, times = [], []
    for _ in range(1 + run["steps"]):
        sync(device)
        t0 = time.perf_counter()
        outs.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in policy.parameters())
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    finite = all(math.isfinite(x) for o in outs for x in o)
    return finite, {"loss_first": f"{outs[0][0]:.4f}", "loss_last": f"{outs[-1][0]:.4f}",
                    "grad_norm": f"{outs[-1][1]:.3e}",
                    **step_stats(step_s, tokens.numel(), params, device, peak_flops)}


def _optimizer_tensors(opt) -> list[torch.Tensor]:
    """Every fp32 main weight and Adam moment the optimizer holds, in a fixed order."""
    out = []
    for inner in getattr(opt, "chained_optimizers", [opt]):
        torch_opt = inner.optimizer
        for g in torch_opt.param_groups:
            for p in g["params"]:
                out.append(p)
                st = torch_opt.state.get(p, {})
                out += [st[k] for k in sorted(st) if torch.is_tensor(st[k]) and st[k].dim()]
    return out


def check_checkpoint(hf_dir: str, work: str, device: torch.device, state: dict):
    """``save_model`` of the trained policy with its optimizer; ``load_model`` into a fresh policy + optimizer."""
    from megatron_async_rlhf.learner import checkpoint as ckpt

    if "model" not in state:
        return False, {"error": "no trained policy (rl_step_bf16 failed)"}
    cfg, model, info, opt = state["cfg"], state["model"], state["info"], state["opt"]
    out_dir = os.path.join(work, "ckpt")
    sync(device)
    t0 = time.perf_counter()
    ckpt.save_model(model, info, cfg.raw, out_dir, optimizer=opt)
    sync(device)
    save_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    _, model2, _, _, opt2 = build_policy(hf_dir, torch.bfloat16, state["ac"], from_hf=False)
    t0 = time.perf_counter()
    ckpt.load_model(model2, out_dir, optimizer=opt2)
    sync(device)
    load_s = time.perf_counter() - t0
    problems = []
    a, b = dict(model.named_parameters()), dict(model2.named_parameters())
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    if differ:
        problems.append(f"{len(differ)} weights differ, e.g. {differ[:3]}")
    if any(p.device != device for p in b.values()):
        problems.append("loaded weights are not on the device")
    ta, tb = _optimizer_tensors(opt), _optimizer_tensors(opt2)
    if len(ta) != len(tb) or not ta:
        problems.append(f"optimizer tensors: {len(ta)} saved, {len(tb)} loaded")
    elif not all(torch.equal(x, y) for x, y in zip(ta, tb)):
        problems.append("optimizer state differs after load")
    state.clear()
    del model, model2, opt, opt2, a, b, ta, tb
    shutil.rmtree(out_dir, ignore_errors=True)
    fields = {"weights": len(differ) or "all_equal", "save_s": f"{save_s:.1f}", "load_s": f"{load_s:.1f}",
              "bytes_on_disk": size}
    if problems:
        fields["problems"] = "; ".join(problems).replace(" ", "_")[:300]
    return not problems, fields


# ----- main -------------------------------------------------------------------------------------------------------

def peak_flops_of(device: torch.device, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def describe(device: torch.device, shape: dict) -> str:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"device={device} name={name.replace(' ', '_')} torch={torch.__version__} cuda={torch.version.cuda} "
            f"megatron_core={version('megatron-core')} transformers={version('transformers')} "
            f"python={sys.version.split()[0]} tf32_matmul={torch.backends.cuda.matmul.allow_tf32} "
            f"shape=h{shape['hidden_size']}xL{shape['num_hidden_layers']}xH{shape['num_attention_heads']}/"
            f"{shape['num_key_value_heads']}xF{shape['intermediate_size']}xV{shape['vocab_size']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="a tiny shape (CI on the CPU) instead of Rho-1B's")
    ap.add_argument("--work", default=None, help="where the HF model and checkpoint go (default: a temporary dir)")
    ap.add_argument("--steps", type=int, default=None, help="timed RL steps per variant (after one warm-up)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("--no-te", action="store_true",
                    help="megatron-core's local layer spec for the learner even where Transformer Engine imports")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --small)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    shape, run = (SMALL, dict(SMALL_RUN)) if args.small else (RHO_1B, dict(FULL_RUN))
    if args.steps:
        run["steps"] = args.steps
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from megatron_async_rlhf.learner import model as learner_model

    if args.no_te:
        learner_model.HAVE_TE = False  # use_te() reads it at build time
    print(describe(device, shape) + f" te_spec={learner_model.use_te()}", flush=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for every model load

    import tempfile

    import torch.distributed as dist

    from megatron_async_rlhf.launch import free_port
    from megatron_async_rlhf.learner.parallel import backend, init_learner_parallel

    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    checks = Checks()
    try:
        init_learner_parallel(1, 1)
        t0 = time.perf_counter()
        hf_dir = make_hf_model(os.path.join(work, "hf"), shape, device)
        print(f"model made and saved in {time.perf_counter() - t0:.1f} s ({hf_dir})", file=sys.stderr, flush=True)
        peak = peak_flops_of(device, args.peak_tflops)
        state: dict = {}
        checks.run("parity_fp32", check_parity, hf_dir, run, device, torch.float32)
        checks.run("parity_bf16", check_parity, hf_dir, run, device, torch.bfloat16)
        checks.run("weight_sync_gather", check_weight_sync, hf_dir, run, device)
        checks.run("rl_step_bf16", check_rl_step, hf_dir, run, device, peak, state)
        checks.run("checkpoint", check_checkpoint, hf_dir, work, device, state)
        checks.run("hf_step_bf16", check_hf_step, hf_dir, run, device, peak)
    finally:
        dist.destroy_process_group()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    passed = sum(checks.results.values())
    ok = passed == len(checks.results)
    print(f"gpu_check={'PASS' if ok else 'FAIL'} passed={passed}/{len(checks.results)} "
          f"seconds={time.perf_counter() - t_start:.1f}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
