"""Full RL checkpoints: everything a run needs to continue exactly where it stopped; finding and checking one.

```
<logging.out_dir>/checkpoints/
    reference/         the frozen reference policy (dist checkpoint), written with the run's first checkpoint
    step_000004/       one checkpoint; complete once renamed from step_000004.tmp-<pid>
        model/         policy weights + optimizer state (megatron dist checkpoint: loads at any TP/PP/DP)
        critic/        PPO with a critic: the value model + its optimizer, likewise
        run_state.json step, schedule state, evaluation state, metrics offset, the run's config, saved layout
        rng.pkl        the prompt stream's position (data cursor) and every learner rank's RNG states
        batch.pkl      async runs only: the round older weights generated before the checkpoint (schedules/rounds.py)
```

Samples are reproducible without saving the engines' state: every generation request carries per-prompt seeds
derived from (seeds, batch index, prompt index) (``sampling_seed``), so a resumed run regenerates what the
uninterrupted run generated, whatever the number of engines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time

from megatron_async_rlhf.errors import ConfigError

log = logging.getLogger(__name__)

RUN_STATE, RNG, BATCH, MODEL, CRITIC, REFERENCE = "run_state.json", "rng.pkl", "batch.pkl", "model", "critic", "reference"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Config fields a resume must not change (prefixes of dotted names): they decide the run's numbers. Everything else
# (the layout, timeouts, logging, evaluation cadence, checkpointing, algorithm.steps) may change.
FIXED = ("mode", "seed", "model", "data", "sft", "algorithm", "reward", "rollout.seed", "rollout.dtype",
         "learner.precision", "learner.distributed_optimizer")
MAY_CHANGE = ("algorithm.steps", "algorithm.micro_batch", "reward.policy_format")  # policy_format: derived from data.*


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def complete_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, directory) of every complete checkpoint under ``out_dir``, oldest first (``*.tmp-*`` are unfinished)."""
    root = checkpoints_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, RUN_STATE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def read_run_state(path: str) -> dict:
    with open(os.path.join(path, RUN_STATE)) as f:
        return json.load(f)


def find_resume(cfg) -> str:
    """The checkpoint directory ``cfg.resume`` names ("" for a fresh start), its config checked against ``cfg``.
    Raises ConfigError naming the field and the fix."""
    if not cfg.resume:
        return ""
    if cfg.resume == "auto":
        found = complete_checkpoints(cfg.logging.out_dir)
        if not found:
            log.info("resume=auto: no checkpoint under %s; starting afresh", checkpoints_dir(cfg.logging.out_dir))
            return ""
        path = found[-1][1]
    else:
        path = os.path.abspath(cfg.resume)
        if ".tmp-" in os.path.basename(path) or not os.path.exists(os.path.join(path, RUN_STATE)):
            raise ConfigError(f"resume={cfg.resume!r} is not a complete checkpoint ({RUN_STATE} missing). Fix: name a "
                              f"checkpoints/step_* directory, or resume=auto for the newest one in logging.out_dir")
    check_compatible(read_run_state(path), cfg, path)
    return path


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(state: dict, cfg, path: str) -> None:
    """Refuse a resume whose config changes what decides the run's numbers, naming every such field."""
    import dataclasses

    saved, now = _flat(state["config"]), _flat(dataclasses.asdict(cfg))
    fixed = [k for k in sorted(set(saved) | set(now))
             if any(k == p or k.startswith(p + ".") for p in FIXED) and k not in MAY_CHANGE]
    bad = [f"{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in fixed if saved.get(k) != now.get(k)]
    if bad:
        raise ConfigError(f"resume from {path}: {'; '.join(bad)}. These must not change across a resume. Fix: set "
                          "them back to the checkpoint's values, or start a new run in another logging.out_dir")
    if cfg.algorithm.steps < state["step"]:
        raise ConfigError(f"resume from {path}: algorithm.steps={cfg.algorithm.steps} is below the checkpoint's step "
                          f"{state['step']}. Fix: algorithm.steps >= {state['step']}")


def sampling_seed(run_seed: int, rollout_seed: int, batch: int) -> int:
    """The seed of RL batch ``batch``'s generation request (each prompt's own: ``rollout.engine.prompt_seed``)."""
    digest = hashlib.blake2b(f"rl/{run_seed}/{rollout_seed}/{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class PromptStream:
    """RL's training prompts, round by round: round ``r`` draws ``per_round`` prompts with the run's python ``Random``
    (the one the warm start drew from before), and is sampled with seed ``sampling_seed(run_seed, rollout_seed, r)``.
    The stream remembers its state before each round's draw: a checkpoint stores the state before the first round it
    does not hold, and a resumed run sets it back (``rng.setstate``)."""

    def __init__(self, ids: list[list[int]], rows: list, rng: random.Random, per_round: int, run_seed: int = 0,
                 rollout_seed: int = 0):
        self.ids, self.rows, self.rng, self.per_round = ids, rows, rng, per_round
        self.seeds = (run_seed, rollout_seed)
        self._before: dict[int, tuple] = {}

    def round(self, r: int) -> tuple[list[list[int]], list]:
        """(prompt token ids, rows) of round ``r``."""
        self._before = {i: s for i, s in self._before.items() if i >= r - 1}
        self._before[r] = self.rng.getstate()
        idx = [self.rng.randrange(len(self.rows)) for _ in range(self.per_round)]
        return [self.ids[j] for j in idx], [self.rows[j] for j in idx]

    def seed(self, r: int) -> int:
        return sampling_seed(*self.seeds, r)

    def state_before(self, r: int) -> tuple:
        return self._before.get(r, self.rng.getstate())


def capture_rng() -> dict:
    """This process's RNG states: torch (CPU and CUDA), python, numpy, Megatron's tracker (dropout, init)."""
    import numpy as np
    import torch

    out = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        out["tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # no tracker set up: nothing of it to restore
        pass
    return out


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def clear_checkpoints(out_dir: str) -> None:
    """A fresh run owns its directory (metrics.jsonl starts afresh too): a previous run's checkpoints go."""
    root = checkpoints_dir(out_dir)
    if os.path.isdir(root):
        log.warning("fresh run (resume unset): removing the previous run's checkpoints in %s", root)
        shutil.rmtree(root)


def save(cfg, step: int, schedule, prompts: PromptStream, policy, ref, critic=None,
         controller: dict | None = None) -> str:
    """Write RL checkpoint ``step`` (between two rounds) atomically, then keep only the newest ``checkpoint.keep``.
    Collective over the learner pool. ``policy``: model, optimizer, layout; ``controller``: the controller's own
    state (metrics, evaluation), None on other ranks."""
    import dataclasses

    import torch.distributed as dist

    from megatron_async_rlhf.learner import checkpoint as ckpt

    sched_state, batch = schedule.checkpoint_state()  # the round in flight, if older weights generated it
    run = {} if controller is None else {"schedule": sched_state, **controller, "config": dataclasses.asdict(cfg)}
    # the data cursor: the prompt stream before the first round the checkpoint does not hold
    cursor_state = prompts.state_before(sched_state["version"] // cfg.algorithm.off_policy_n + (batch is not None))
    model, optimizer, info, hf_config_raw = policy.model, policy.opt, policy.info, policy.mcfg.raw
    out_dir, keep = cfg.logging.out_dir, cfg.checkpoint.keep
    t0 = time.perf_counter()
    root = checkpoints_dir(out_dir)
    final = os.path.join(root, f"step_{step:06d}")
    box = [f"{final}.tmp-{os.getpid()}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    reference = os.path.join(root, REFERENCE)
    if not os.path.exists(os.path.join(reference, ckpt.META)):  # the reference never changes: written once
        ckpt.save_model(ref, info, hf_config_raw, reference)
    ckpt.save_model(model, info, hf_config_raw, os.path.join(tmp, MODEL), optimizer=optimizer, atomic=False)
    if critic is not None:
        ckpt.save_model(critic.model, info, hf_config_raw, os.path.join(tmp, CRITIC), optimizer=critic.opt,
                        atomic=False)
    rngs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(capture_rng(), rngs, dst=0)
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, RNG), "wb") as f:
            pickle.dump({"data_cursor": cursor_state, "ranks": rngs}, f)
        if batch is not None:
            with open(os.path.join(tmp, BATCH), "wb") as f:
                pickle.dump(batch, f)
        with open(os.path.join(tmp, RUN_STATE), "w") as f:
            json.dump({**run, "step": step, "batch_saved": batch is not None, "learner_world": len(rngs),
                       "layout": {"tp": info.tp, "pp": info.pp}, "created": time.time()}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # the commit: a checkpoint is complete once its directory has its final name
        for _, old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):  # left by runs killed while writing
            if ".tmp-" in name:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        log.info("checkpoint %s written in %.2f s", final, time.perf_counter() - t0)
    dist.barrier()
    return final


def load_critic(path: str, critic) -> None:
    """PPO's value model and its optimizer, as checkpointed (collective over the learner pool)."""
    from megatron_async_rlhf.learner import checkpoint as ckpt

    ckpt.load_model(critic.model, os.path.join(path, CRITIC), critic.opt)


def open_run(cfg, is_controller: bool) -> tuple[str, dict | None]:
    """(checkpoint directory, its run state) that ``resume`` names, or ("", None): a fresh run, whose directory loses
    the previous run's checkpoints."""
    path = find_resume(cfg)
    if not path and is_controller:
        clear_checkpoints(cfg.logging.out_dir)
    return path, read_run_state(path) if path else None


def load(path: str, policy, ref, prompts: PromptStream) -> tuple[dict, object]:
    """Restore weights, optimizer, reference, RNG and the prompt stream from checkpoint ``path`` (collective over the
    learner pool, at any layout); returns what the schedule resumes from: (its state, the saved round or None)."""
    import torch.distributed as dist

    from megatron_async_rlhf.learner import checkpoint as ckpt

    state = read_run_state(path)
    ckpt.load_model(policy.model, os.path.join(path, MODEL), policy.opt)
    ckpt.load_model(ref, os.path.join(os.path.dirname(path), REFERENCE))
    with open(os.path.join(path, RNG), "rb") as f:
        rng = pickle.load(f)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != len(rng["ranks"]):
        log.info("learner layout changed (%d -> %d ranks): every rank takes rank 0's saved RNG states",
                 len(rng["ranks"]), world)
    restore_rng(rng["ranks"][rank if world == len(rng["ranks"]) else 0])
    prompts.rng.setstate(tuple(rng["data_cursor"]))
    batch = None
    if state["batch_saved"]:
        with open(os.path.join(path, BATCH), "rb") as f:
            batch = pickle.load(f)
    log.info("resumed from %s (step %d)", path, state["step"])
    return state["schedule"], batch
