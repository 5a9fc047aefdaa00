#!/usr/bin/env python
"""Baseline benchmark: seconds per training step of HF TRL's ``OnlineDPOTrainer`` (trl 1.16.0, HF ``generate``, no
vLLM) on CPU, at the shape of the project's end-to-end target. A script, not a test: run it on demand, on a quiet
machine, in the same session as the project's own run it is compared with.

    python tools/bench_trl.py [--hf DIR] [--steps 5] [--threads 2] [--bf16]

trl is an optional, bench-only dependency (not in pyproject / tools/install.sh). Install it into the venv without
touching the pinned packages: ``.venv/bin/pip install --no-deps trl==1.16.0`` (its other imports are already there).

What runs: without ``--hf`` the issue's reference shape (``REFERENCE_SHAPE`` of ``tools/bench_learner.py``: LLaMA
hidden 512, intermediate 1376, 6 layers, 4 heads / 2 KV groups (head_dim 128), vocab 512, 17.9M params), made once
under ``--work`` with the offline tokenizer. Prompts are the project's built-in arithmetic task (``load_rows`` of a
default ``DataConfig``; the tokenizer's BOS prepended, as the project's ``prompt_ids`` does); the reward is the
project's exact-match ``math_reward(completion, answer)``, given to TRL as a reward function. One TRL optimizer step
is ``--prompts`` prompts x 2 completions (TRL's Online DPO always samples 2 per prompt) of at most
``--max-new-tokens`` tokens at temperature 1.0: ``gradient_accumulation_steps = prompts / micro_batch`` micro-steps,
each one ``model.generate`` of ``micro_batch`` x 2 sequences, policy forward + reference forward over those rows, the
sigmoid DPO loss on the (higher reward, lower reward) pair (ties: the first sample is "chosen"), backward; then grad
clipping (1.0) and one AdamW step. fp32 weights; ``--bf16`` turns on TRL's autocast (``bf16=True``, its default).
Gradient checkpointing is off (TRL's default is on, which also turns the KV cache off in ``generate``); no eval, no
saving, no logging. ``torch.set_num_threads(--threads)``, no core pinning.

Timing: ``--warmup`` steps, then ``--steps`` steps. A step's time is the wall time between the Trainer's
``on_step_begin`` and ``on_step_end`` callbacks (all of its micro-steps, the clip and the optimizer step; the
prefetch of the step's batches from the dataloader falls just before it and is negligible here); its generation time
is the sum over its micro-steps of the time inside TRL's ``_generate`` (tokenizing the prompts, ``model.generate``,
cutting at EOS). Each step line also gives the step's completion tokens (up to and including EOS; a ``generate``
call decodes until every one of its sequences has ended or ``--max-new-tokens``). The last line is
``trl_step_s=<median> trl_gen_s=<median> steps=<n> threads=<t> precision=<fp32|bf16>``.

Run it on a quiet machine with at least ``--threads`` free cores: with more threads than free cores, OpenMP's
barriers make every op wait for a descheduled thread and times grow many-fold (tens of times, seen on a loaded
2-core box), so such numbers say nothing.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch starts its thread pool; --threads sets the count
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # Online DPO is under trl.experimental in 1.16

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_learner import REFERENCE_SHAPE  # noqa: E402

TRL_VERSION = "1.16.0"
INSTALL_HINT = f".venv/bin/pip install --no-deps trl=={TRL_VERSION}"


def import_trl() -> tuple[type, type]:
    """(OnlineDPOConfig, OnlineDPOTrainer), or exit with how to install trl. In trl 1.16 Online DPO lives under
    ``trl.experimental.online_dpo``."""
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")  # vLLM is not used here
    try:
        import trl
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    except ImportError as e:
        sys.exit(f"bench_trl: cannot import trl's OnlineDPOTrainer ({e}). trl is a bench-only dependency; install it "
                 f"with:\n    {INSTALL_HINT}")
    if trl.__version__ != TRL_VERSION:
        print(f"warning: trl {trl.__version__} installed; this baseline was written for trl {TRL_VERSION}",
              flush=True)
    return OnlineDPOConfig, OnlineDPOTrainer


def reference_model_dir(work: str) -> str:
    """The reference-shape HF LLaMA directory under ``work``, made once (shared with ``tools/bench_learner.py``)."""
    from megatron_async_rlhf.models.tiny import make_tiny_llama

    hf_dir = os.path.join(work, "reference-shape")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        make_tiny_llama(hf_dir, "tiny-gqa", **REFERENCE_SHAPE)
    return hf_dir


def prompt_dataset(n: int, bos: str | None, run_dir: str):
    """``n`` rows ``{prompt, answer}`` of the project's default prompt source (built-in arithmetic). TRL tokenizes
    the prompt text without special tokens, so the BOS goes into the text (a special token, parsed as one id)."""
    from datasets import Dataset

    from megatron_async_rlhf.config import DataConfig
    from megatron_async_rlhf.data.tasks import format_prompt, load_rows

    d = DataConfig(train_size=n, eval_size=1)
    rows, _ = load_rows(d, run_dir)
    return Dataset.from_list([{"prompt": (bos or "") + format_prompt(r.prompt, d.prompt_template), "answer": r.answer}
                              for r in rows])


def math_reward_func(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """The project's exact-match math reward, in TRL's reward-function signature (``answer`` is the dataset column,
    repeated by TRL for the second completion of each prompt)."""
    from megatron_async_rlhf.rewards import math_reward

    return [math_reward(c, a) for c, a in zip(completions, answer, strict=True)]


class StepTimer:
    """Per optimizer step: wall time (``on_step_begin`` -> ``on_step_end``), time in generation, completion tokens."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.gen_s: list[float] = []
        self.tokens: list[int] = []
        self._t0 = 0.0
        self._gen = 0.0
        self._tok = 0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._gen, timer._tok = 0.0, 0
                timer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.step_s.append(time.perf_counter() - timer._t0)
                timer.gen_s.append(timer._gen)
                timer.tokens.append(timer._tok)
                print(f"step {state.global_step}: {timer.step_s[-1]:.3f} s (generation {timer._gen:.3f} s, "
                      f"{timer._tok} completion tokens)", flush=True)

        return _Callback()

    def wrap_generate(self, generate: Callable) -> Callable:
        """TRL's ``_generate`` with its time and completion token count added to the current step."""
        def timed(*args: Any, **kwargs: Any):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            self._gen += time.perf_counter() - t0
            self._tok += int(out[3].sum())  # completion_mask
            return out

        return timed


def trl_config(args: argparse.Namespace, config_cls: type, out_dir: str):
    """OnlineDPOConfig for one step = ``args.prompts`` prompts x 2 completions, CPU, no eval / saving / logging."""
    if args.prompts % args.micro_batch:
        sys.exit(f"--prompts {args.prompts} must be a multiple of --micro-batch {args.micro_batch}")
    return config_cls(
        output_dir=out_dir, use_cpu=True, seed=args.seed,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.prompts // args.micro_batch,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, max_grad_norm=1.0,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0, use_vllm=False,
        beta=0.1, loss_type="sigmoid", bf16=args.bf16, fp16=False, gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", help="HF LLaMA directory (default: the reference shape, made once under --work)")
    ap.add_argument("--work", default="runs/bench_learner", help="where the reference-shape model lives")
    ap.add_argument("--out", default="runs/bench_trl", help="TRL output_dir (nothing is saved there)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per optimizer step (x 2 completions)")
    ap.add_argument("--micro-batch", type=int, default=16,
                    help="prompts per TRL micro-step (per_device_train_batch_size): 2x as many rows")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="TRL's bf16 autocast (weights stay fp32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    config_cls, trainer_cls = import_trl()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = args.hf or reference_model_dir(args.work)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    dataset = prompt_dataset(args.prompts * (args.warmup + args.steps), tok.bos_token, args.out)
    timer = StepTimer()
    trainer = trainer_cls(model=model, reward_funcs=math_reward_func, args=trl_config(args, config_cls, args.out),
                          train_dataset=dataset, processing_class=tok, callbacks=[timer.callback()])
    trainer._generate = timer.wrap_generate(trainer._generate)
    precision = "bf16" if args.bf16 else "fp32"
    print(f"model {hf_dir}: {n_params / 1e6:.1f}M params; trl OnlineDPOTrainer, {args.prompts} prompts x 2 "
          f"completions x <= {args.max_new_tokens} new tokens per step ({args.prompts // args.micro_batch} micro-steps "
          f"of {args.micro_batch} prompts), {precision}, {torch.get_num_threads()} threads; "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
    trainer.train()

    step_s, gen_s = timer.step_s[args.warmup:], timer.gen_s[args.warmup:]
    if not step_s:
        sys.exit(f"no timed steps ({len(timer.step_s)} steps ran, {args.warmup} warm-up)")
    med_step, med_gen = statistics.median(step_s), statistics.median(gen_s)
    print(f"step s: median {med_step:.3f} ({', '.join(f'{t:.3f}' for t in step_s)}); generation s: median "
          f"{med_gen:.3f} ({', '.join(f'{t:.3f}' for t in gen_s)})", flush=True)
    print(f"trl_step_s={med_step:.3f} trl_gen_s={med_gen:.3f} steps={len(step_s)} threads={torch.get_num_threads()} "
          f"precision={precision}")


if __name__ == "__main__":
    main()
