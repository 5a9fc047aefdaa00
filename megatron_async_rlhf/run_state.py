"""Full checkpoints of RL runs (and of reward-model runs, ``modes/rm.py``): everything a run needs to continue
exactly where it stopped; finding and checking one.

```
<logging.out_dir>/checkpoints/
    reference/         the frozen reference policy (dist checkpoint), written with the run's first checkpoint
    step_000004/       one checkpoint; complete once renamed from step_000004.tmp-<pid>
        model/         policy weights + optimizer state (megatron dist checkpoint: loads at any TP/PP/DP)
        critic/        PPO with a critic: the value model + its optimizer, likewise
        run_state.json step, schedule state, evaluation state, metrics offset, the run's config, saved layout
        rng.json       the prompt stream's position (data cursor) and every learner rank's RNG states
        batch.json     async runs only: the round older weights generated before the checkpoint (schedules/rounds.py)
        manifest.json  sha256 and size of every file above, written last (``learner/manifest.py``)
```

A mode=rm checkpoint is ``model/`` (the scalar-head model + its optimizer), ``run_state.json``, ``rng.json`` (the
data order: its ``Random`` state and the rest of the epoch, and the RNG states) and ``manifest.json``, with the same
writer (``save_checkpoint``) and reader (``restore_learner``); no reference.

No file of the project's own is a pickle: state files are JSON (tensors and arrays as hex bytes, dataclasses only of
the few types a checkpoint holds), so a checkpoint from elsewhere cannot run code when loaded. Files are fsynced
before the directory is renamed into place; ``resume=auto`` verifies the manifest and falls back to the previous
complete checkpoint, with a warning naming the bad file, when the newest is truncated or corrupted. A fresh run never
deletes checkpoints it finds: it stops before launch unless ``checkpoint.overwrite=true``.

Samples are reproducible without saving the engines' state: every generation request carries per-prompt seeds
derived from (seeds, batch index, prompt index) (``sampling_seed``), so a resumed run regenerates what the
uninterrupted run generated, whatever the number of engines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time

from megatron_async_rlhf.learner import manifest
from megatron_async_rlhf.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RUN_STATE, RNG, BATCH, MODEL, CRITIC, REFERENCE = "run_state.json", "rng.json", "batch.json", "model", "critic", "reference"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Config fields a resume must not change (prefixes of dotted names): they decide the run's numbers. Everything else
# (the layout, timeouts, logging, evaluation cadence, checkpointing, algorithm.steps) may change.
FIXED = ("mode", "seed", "model", "data", "sft", "algorithm", "reward", "rollout.seed", "rollout.dtype",
         "learner.precision", "learner.distributed_optimizer")
MAY_CHANGE = ("algorithm.steps", "algorithm.micro_batch", "reward.policy_format")  # policy_format: derived from data.*
# mode=rm: its own section instead of the RL ones; rm.steps may change (a linear schedule then decays over the new
# total from the resumed step on)
RM_FIXED = ("mode", "seed", "model", "data", "rm", "learner.precision", "learner.distributed_optimizer")
RM_MAY_CHANGE = ("rm.steps", "rm.eval_every", "rm.micro_batch")


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def step_dirs(out_dir: str) -> list[tuple[int, str]]:
    """(step, directory) of every ``step_*`` directory under ``out_dir``, complete or not, oldest first."""
    root = checkpoints_dir(out_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return sorted(found)


def complete_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, directory) of every committed checkpoint (its manifest written), oldest first; not verified here."""
    return [(s, d) for s, d in step_dirs(out_dir) if os.path.exists(os.path.join(d, manifest.MANIFEST))]


def read_run_state(path: str) -> dict:
    """``run_state.json``: plain JSON (the controller's own state as it gave it), refused if it is anything else."""
    state = read_state_file(os.path.join(path, RUN_STATE), tagged=False)
    if not isinstance(state, dict) or "step" not in state or not isinstance(state.get("config"), dict):
        raise ConfigError(f"checkpoint file {os.path.join(path, RUN_STATE)} holds no run state; refused. Fix: resume "
                          "from a checkpoint this project wrote")
    return state


def check_fresh_start(cfg) -> None:
    """A run with ``resume`` unset must not find checkpoints in its ``logging.out_dir``: they would be lost (metrics
    and checkpoints start afresh). Raises ConfigError naming the ways on, unless ``checkpoint.overwrite=true``."""
    if cfg.resume or cfg.checkpoint.overwrite:
        return
    found = step_dirs(cfg.logging.out_dir)
    if found:
        way = "resume=auto to continue it, " if cfg.mode in ("rl", "rm") else ""
        raise ConfigError(
            f"logging.out_dir={cfg.logging.out_dir} holds the checkpoints of an earlier run ({len(found)} under "
            f"{checkpoints_dir(cfg.logging.out_dir)}, newest step {found[-1][0]}) and resume is unset. Fix: {way}a "
            "new logging.out_dir for a new run, or checkpoint.overwrite=true to delete them and start afresh")


def find_resume(cfg) -> str:
    """The checkpoint directory ``cfg.resume`` names ("" for a fresh start), verified against its manifest and its
    config checked against ``cfg``. ``resume=auto`` takes the newest intact checkpoint, warning about each newer one
    that is not. Raises ConfigError naming the field (or the bad file) and the fix."""
    if not cfg.resume:
        check_fresh_start(cfg)
        return ""
    if cfg.resume == "auto":
        candidates = step_dirs(cfg.logging.out_dir)
        if not candidates:
            log.info("resume=auto: no checkpoint under %s; starting afresh", checkpoints_dir(cfg.logging.out_dir))
            return ""
        bad, path = [], ""
        for _, d in reversed(candidates):
            problem = manifest.verify(d)
            if problem is None:
                path = d
                break
            bad.append(problem)
            log.warning("resume=auto: skipping checkpoint %s: %s", d, problem)
        if not path:
            raise ConfigError(f"resume=auto: no intact checkpoint under {checkpoints_dir(cfg.logging.out_dir)} "
                              f"({'; '.join(bad)}). Fix: restore the files, or start a new run in a new "
                              "logging.out_dir (or checkpoint.overwrite=true with resume unset)")
        if bad:
            log.warning("resume=auto: falling back to %s, the newest intact checkpoint", path)
    else:
        path = os.path.abspath(cfg.resume)
        if ".tmp-" in os.path.basename(path) or not os.path.isdir(path):
            raise ConfigError(f"resume={cfg.resume!r} is not a complete checkpoint. Fix: name a checkpoints/step_* "
                              "directory, or resume=auto for the newest one in logging.out_dir")
        problem = manifest.verify(path)
        if problem is not None:
            raise ConfigError(f"resume={cfg.resume!r} is not an intact checkpoint: {problem}. Fix: name another "
                              "checkpoints/step_* directory, or resume=auto for the newest intact one")
    state = read_run_state(path)
    reference = os.path.join(os.path.dirname(path), REFERENCE)
    problem = manifest.verify(reference) if state["config"].get("mode") != "rm" else None  # rm: no reference
    if problem is not None:
        raise ConfigError(f"resume from {path}: the reference policy beside it is not intact: {problem}. Fix: "
                          "restore it, or start a new run in a new logging.out_dir")
    check_compatible(state, cfg, path)
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
    rm = cfg.mode == "rm" and saved.get("mode") == "rm"
    fixed_, may_change = (RM_FIXED, RM_MAY_CHANGE) if rm else (FIXED, MAY_CHANGE)
    fixed = [k for k in sorted(set(saved) | set(now))
             if any(k == p or k.startswith(p + ".") for p in fixed_) and k not in may_change]
    bad = [f"{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in fixed if saved.get(k) != now.get(k)]
    if bad:
        raise ConfigError(f"resume from {path}: {'; '.join(bad)}. These must not change across a resume. Fix: set "
                          "them back to the checkpoint's values, or start a new run in another logging.out_dir")
    name, steps = ("rm.steps", cfg.rm.steps) if rm else ("algorithm.steps", cfg.algorithm.steps)
    if steps < state["step"]:
        raise ConfigError(f"resume from {path}: {name}={steps} is below the checkpoint's step "
                          f"{state['step']}. Fix: {name} >= {state['step']}")


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
        self.lookahead = 1  # rounds drawn ahead of the oldest one a checkpoint may need (schedule=fully_async: more)

    def round(self, r: int) -> tuple[list[list[int]], list]:
        """(prompt token ids, rows) of round ``r``."""
        self._before = {i: s for i, s in self._before.items() if i >= r - self.lookahead}
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


# ----- state files: JSON, never pickle -------------------------------------------------------------------------
_TAG = "__mrlhf__"


def _dataclasses() -> dict:
    """The only classes a state file may name: what a saved round holds."""
    from megatron_async_rlhf.data.tasks import Row
    from megatron_async_rlhf.rollout.base import Sample
    from megatron_async_rlhf.schedules import Batch

    return {c.__name__: c for c in (Batch, Sample, Row)}


def to_json(obj):
    """``obj`` as plain JSON values: tuples, tensors, numpy arrays and scalars, and the dataclasses of
    ``_dataclasses`` tagged so that ``from_json`` rebuilds them exactly (floats round-trip by repr)."""
    import numpy as np
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [to_json(v) for v in obj]
        return items if isinstance(obj, list) else {_TAG: "tuple", "items": items}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj) or _TAG in obj:
            raise TypeError(f"checkpoint state: a dict with keys {list(obj)[:5]} cannot be written as JSON")
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().contiguous()
        return {_TAG: "tensor", "dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape),
                "hex": obj.view(-1).view(torch.uint8).numpy().tobytes().hex() if obj.numel() else ""}
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.ascontiguousarray(obj)
        return {_TAG: "ndarray" if isinstance(obj, np.ndarray) else "npscalar", "dtype": arr.dtype.str,
                "shape": list(arr.shape), "hex": arr.tobytes().hex()}
    if dataclasses.is_dataclass(obj) and type(obj) in _dataclasses().values():
        return {_TAG: "dataclass", "class": type(obj).__name__,
                "fields": {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    raise TypeError(f"checkpoint state: a {type(obj).__qualname__} cannot be written as JSON")


def from_json(obj):
    """The inverse of ``to_json``; anything it did not write is a ValueError (nothing is imported by name)."""
    import numpy as np
    import torch

    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(_TAG)
    if kind is None:
        return {k: from_json(v) for k, v in obj.items()}
    if kind == "tuple":
        return tuple(from_json(v) for v in obj["items"])
    if kind == "tensor":
        dtype = getattr(torch, obj["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {obj['dtype']!r}")
        raw = torch.frombuffer(bytearray(bytes.fromhex(obj["hex"])), dtype=torch.uint8) if obj["hex"] else \
            torch.empty(0, dtype=torch.uint8)
        return raw.view(dtype).reshape(obj["shape"]).clone()
    if kind in ("ndarray", "npscalar"):
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject:
            raise ValueError("object arrays are not state")
        arr = np.frombuffer(bytes.fromhex(obj["hex"]), dtype=dtype).reshape(obj["shape"]).copy()
        return arr if kind == "ndarray" else arr[()]
    if kind == "dataclass":
        cls = _dataclasses().get(obj["class"])
        if cls is None:
            raise ValueError(f"class {obj['class']!r} is not one a checkpoint holds")
        return cls(**{k: from_json(v) for k, v in obj["fields"].items()})
    raise ValueError(f"unknown tagged value {kind!r}")


def read_state_file(path: str, tagged: bool = True):
    """A state file's contents (``tagged``: as ``to_json`` wrote them); a file that is not this project's JSON (e.g.
    a pickle put in its place) is refused with a ConfigError naming it, and nothing in it is run."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        return from_json(obj) if tagged else obj
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint file {path} is not a state file of this project ({type(e).__name__}: {e}); "
                          "refused. Fix: resume from a checkpoint this project wrote") from None


def remove_checkpoints(out_dir: str) -> None:
    """``checkpoint.overwrite=true``: a fresh run takes the directory, deleting an earlier run's checkpoints."""
    root = checkpoints_dir(out_dir)
    if os.path.isdir(root):
        log.warning("checkpoint.overwrite=true: removing the earlier run's checkpoints in %s", root)
        shutil.rmtree(root)


def _remove_leftovers(out_dir: str) -> None:
    """A fresh run without checkpoints to keep: an unfinished save's directories and a reference of a run that never
    completed a checkpoint go (they belong to no checkpoint)."""
    root = checkpoints_dir(out_dir)
    if os.path.isdir(root) and not step_dirs(out_dir):
        for name in os.listdir(root):
            if ".tmp-" in name or name == REFERENCE:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save(cfg, step: int, schedule, prompts: PromptStream, policy, ref, critic=None,
         controller: dict | None = None) -> str:
    """Write RL checkpoint ``step`` (between two rounds) atomically, then keep only the newest ``checkpoint.keep``.
    Collective over the learner pool. ``policy``: model, optimizer, layout; ``controller``: the controller's own
    state (metrics, evaluation), None on other ranks. A failed write (a full disk) raises CheckpointError and leaves
    every earlier checkpoint as it was."""
    sched_state, batch = schedule.checkpoint_state()  # the round in flight, if older weights generated it
    run = None if controller is None else {"schedule": sched_state, **controller}
    # the data cursor: the prompt stream before the first round the checkpoint does not hold
    cursor_state = prompts.state_before(sched_state["version"] // cfg.algorithm.off_policy_n + (batch is not None))
    models = {MODEL: (policy.model, policy.opt)}
    if critic is not None:
        models[CRITIC] = (critic.model, critic.opt)
    return save_checkpoint(cfg, step, policy.info, policy.mcfg.raw, models, run, cursor_state,
                           {BATCH: batch} if batch is not None else {}, reference=ref)


def save_checkpoint(cfg, step: int, info, hf_config_raw: dict, models: dict, run: dict | None, data_cursor,
                    files: dict | None = None, reference=None) -> str:
    """Write checkpoint ``step`` of any mode atomically, then keep only the newest ``checkpoint.keep``. Collective
    over the learner pool. ``models``: directory name -> (model, optimizer), megatron dist checkpoints; ``run``: the
    controller's state for ``run_state.json`` (None on other ranks); ``data_cursor``: the data's position (JSON
    state, in ``rng.json`` with every rank's RNG states); ``files``: more state files, name -> state (rank 0's);
    ``reference``: a frozen model written once beside the checkpoints. A failed write (a full disk) raises
    CheckpointError and leaves every earlier checkpoint as it was."""
    import torch.distributed as dist

    from megatron_async_rlhf.learner import checkpoint as ckpt

    run = {} if run is None else {**run, "config": dataclasses.asdict(cfg)}
    out_dir, keep = cfg.logging.out_dir, cfg.checkpoint.keep
    t0 = time.perf_counter()
    root = checkpoints_dir(out_dir)
    final = os.path.join(root, f"step_{step:06d}")
    box = [f"{final}.tmp-{os.getpid()}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    try:
        ref_dir = os.path.join(root, REFERENCE)
        if reference is not None and not os.path.exists(os.path.join(ref_dir, manifest.MANIFEST)):  # written once
            ckpt.save_model(reference, info, hf_config_raw, ref_dir)
        for name, (model, optimizer) in models.items():
            ckpt.save_model(model, info, hf_config_raw, os.path.join(tmp, name), optimizer=optimizer, atomic=False)
        rngs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(capture_rng(), rngs, dst=0)
        if dist.get_rank() == 0:
            extra = dict(files or {})
            state = {RNG: {"data_cursor": data_cursor, "ranks": rngs}, **extra}
            state[RUN_STATE] = {**run, "step": step, "batch_saved": BATCH in extra, "learner_world": len(rngs),
                                "layout": {"tp": info.tp, "pp": info.pp}, "created": time.time()}
            write_checkpoint(tmp, final, step, state, out_dir, keep)
            log.info("checkpoint %s written in %.2f s", final, time.perf_counter() - t0)
    except BaseException as e:  # noqa: B036 -- torch's CheckpointException (a full disk on a rank) is a BaseException
        from torch.distributed.checkpoint.api import CheckpointException

        if not isinstance(e, (OSError, CheckpointException)):
            raise
        raise _save_failed(final, tmp if dist.get_rank() == 0 else None, out_dir, e) from e
    dist.barrier()
    return final


def _save_failed(final: str, tmp: str | None, out_dir: str, e: BaseException) -> CheckpointError:
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = complete_checkpoints(out_dir)
    prev = f"the previous checkpoint {kept[-1][1]} is intact" if kept else "no earlier checkpoint exists"
    return CheckpointError(f"checkpoint {final} could not be written ({type(e).__name__}: {e}); {prev} and the "
                           f"unfinished one was removed. Fix: free space under {checkpoints_dir(out_dir)} (or set "
                           "logging.out_dir to a larger disk), then continue with resume=auto")


def write_checkpoint(tmp: str, final: str, step: int, files: dict, out_dir: str, keep: int) -> None:
    """Rank 0's part of a save: the state files into ``tmp`` (beside what the learner ranks wrote there), the
    manifest last, the rename to ``final``; then unfinished saves and the checkpoints older than this one beyond the
    newest ``keep`` go (newer ones, of a run that resumed from an older checkpoint, are left alone: this one is never
    the one deleted). A failed write (a full disk) raises CheckpointError, ``tmp`` removed and every checkpoint as it
    was."""
    try:
        os.makedirs(tmp, exist_ok=True)
        for name, obj in files.items():
            plain = name == RUN_STATE  # the controller's state as JSON gives it back, as before
            manifest.write_json(os.path.join(tmp, name), obj if plain else to_json(obj), indent=1 if plain else None)
        manifest.write_manifest(tmp)
        manifest.commit(tmp, final)  # a checkpoint is complete once its directory has its final name
    except OSError as e:
        raise _save_failed(final, tmp, out_dir, e) from e
    older = [d for s, d in complete_checkpoints(out_dir) if s < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    root = checkpoints_dir(out_dir)
    for name in os.listdir(root):  # left by runs killed while writing
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_critic(path: str, critic) -> None:
    """PPO's value model and its optimizer, as checkpointed (collective over the learner pool)."""
    from megatron_async_rlhf.learner import checkpoint as ckpt

    ckpt.load_model(critic.model, os.path.join(path, CRITIC), critic.opt)


def open_run(cfg, is_controller: bool) -> tuple[str, dict | None]:
    """(checkpoint directory, its run state) that ``resume`` names, or ("", None): a fresh run. The controller
    finds and verifies it and tells the other learner ranks (one read of the files, one decision). A fresh run deletes
    earlier checkpoints only with ``checkpoint.overwrite=true`` (the preflight stopped it otherwise)."""
    import torch.distributed as dist

    box = [None]
    if is_controller:
        try:
            path = find_resume(cfg) if cfg.resume or not cfg.checkpoint.overwrite else ""
            if not path:
                if cfg.checkpoint.overwrite and not cfg.resume:
                    remove_checkpoints(cfg.logging.out_dir)
                _remove_leftovers(cfg.logging.out_dir)
            box = [("ok", path)]
        except ConfigError as e:
            box = [("error", str(e))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise ConfigError(value)
    return value, read_run_state(value) if value else None


def read_state_files(path: str, batch_saved: bool) -> tuple[dict, object]:
    """(RNG states and data cursor, the saved round or None) of checkpoint ``path``."""
    rng = read_state_file(os.path.join(path, RNG))
    batch = read_state_file(os.path.join(path, BATCH)) if batch_saved else None
    return rng, batch


def load(path: str, policy, ref, prompts: PromptStream) -> tuple[dict, object]:
    """Restore weights, optimizer, reference, RNG and the prompt stream from checkpoint ``path`` (collective over the
    learner pool, at any layout); returns what the schedule resumes from: (its state, the saved round or None)."""
    state = read_run_state(path)
    rng, batch = read_state_files(path, state["batch_saved"])  # refused before any weight is read if not JSON
    restore_learner(path, rng, {MODEL: (policy.model, policy.opt)}, reference=ref)
    prompts.rng.setstate(tuple(rng["data_cursor"]))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state["schedule"], batch


def restore_learner(path: str, rng: dict, models: dict, reference=None) -> None:
    """Load ``models`` (directory name -> (model, optimizer)) of checkpoint ``path``, the ``reference`` beside it, and
    this rank's RNG states from ``rng`` (its ``rng.json``). Collective over the learner pool, at any layout."""
    import torch.distributed as dist

    from megatron_async_rlhf.learner import checkpoint as ckpt

    for name, (model, optimizer) in models.items():
        ckpt.load_model(model, os.path.join(path, name), optimizer)
    if reference is not None:
        ckpt.load_model(reference, os.path.join(os.path.dirname(path), REFERENCE))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != len(rng["ranks"]):
        log.info("learner layout changed (%d -> %d ranks): every rank takes rank 0's saved RNG states",
                 len(rng["ranks"]), world)
    restore_rng(rng["ranks"][rank if world == len(rng["ranks"]) else 0])
