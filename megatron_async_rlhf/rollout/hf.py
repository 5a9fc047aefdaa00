"""The transformers rollout backend (``rollout.backend=hf``): a plain ``AutoModelForCausalLM`` sampler.

Slow but exact: one prompt at a time (its n samples as one batch of equal-length rows, so no padding ever enters a
forward), KV cache, fp32 log-softmax. For debugging a log-prob mismatch between vLLM and the learner (a second,
independent sampler of the same weights) and for architectures vLLM cannot serve. Same contract as the vLLM backend:
log-probs of the distribution sampled from (after temperature and top-p, vLLM's ``processed_logprobs``), greedy at
temperature 0, per-prompt seeds from :func:`prompt_seed` (sample k of a prompt uses ``prompt_seed(...) + k``, as vLLM
does), the same weight buckets (HF names) loaded between calls.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.rollout.base import EngineSettings, RolloutBackend, Sample, SamplingSettings, prompt_seed, \
    register_backend

log = logging.getLogger(__name__)


@register_backend("hf")
class HFBackend(RolloutBackend):
    """A transformers model on one device; weights replaced tensor by tensor, every name checked."""

    def __init__(self, settings: EngineSettings, index: int = 0):
        super().__init__(settings, index)
        if settings.tensor_parallel != 1:
            raise ConfigError(f"rollout.backend=hf runs each engine on one device, but cluster.rollout_tp="
                              f"{settings.tensor_parallel}. Fix: cluster.rollout_tp=1, or rollout.backend=vllm")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars in every engine's log

        rc = settings.rollout
        t0 = time.perf_counter()
        dtype = "auto" if rc.dtype == "auto" else getattr(torch, rc.dtype)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype).to(self.device).eval()
        self.max_model_len = rc.max_model_len
        self.eos_ids = _eos_ids(self.model, settings.model)
        self.generator = torch.Generator(self.device).manual_seed(rc.seed + index)  # unseeded requests
        # tied weights (lm_head = embed_tokens) appear once in named_parameters: the other names are aliases
        self.params = dict(self.model.named_parameters())
        self.weight_dtype = next(iter(self.params.values())).dtype
        self.aliases = {n: c for n, t in self.model.state_dict(keep_vars=True).items() if n not in self.params
                        for c, p in self.params.items() if p is t}
        log.info("engine %d (hf) up in %.1f s (%s, %s)", index, time.perf_counter() - t0, settings.model, rc.dtype)

    # ----- sampling --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, first_index: int = 0) -> list[Sample]:
        samples = []
        for i, prompt in enumerate(prompts):
            if sampling.seed is None:
                gens = [self.generator] * sampling.n
            else:
                seed = prompt_seed(sampling.seed, first_index + i)
                gens = [torch.Generator(self.device).manual_seed(seed + k) for k in range(sampling.n)]
            for toks, lps, reason in self._sample_prompt(prompt, sampling, gens):
                samples.append(Sample(first_index + i, list(prompt), toks, lps, reason, self.version, self.index))
        return samples

    def _sample_prompt(self, prompt: list[int], s: SamplingSettings, gens: list[torch.Generator]):
        """n samples of one prompt: (token ids, log-probs, finish reason) each. Rows stay equal in length (a finished
        row keeps decoding, its tokens dropped) so the batch never needs padding."""
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in rollout.max_model_len="
                             f"{self.max_model_len}")
        limit = min(s.max_new_tokens, room)
        stops = set(s.stop_token_ids) | self.eos_ids
        ids = torch.tensor([prompt] * s.n, device=self.device)  # [n, P]
        out = self.model(input_ids=ids, use_cache=True)
        toks, lps, done = [[] for _ in gens], [[] for _ in gens], [None] * s.n
        while True:
            logits = out.logits[:, -1].float()  # [n, V]
            nxt = []
            for r, g in enumerate(gens):
                t, lp = _pick(logits[r], s, g)
                nxt.append(t)
                if done[r] is None:
                    toks[r].append(t)
                    lps[r].append(lp)
                    if t in stops:
                        done[r] = "stop"
                    elif len(toks[r]) == limit:
                        done[r] = "length"
            if all(done):
                return list(zip(toks, lps, done))
            out = self.model(input_ids=torch.tensor(nxt, device=self.device)[:, None],
                             past_key_values=out.past_key_values, use_cache=True)

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of each sequence's tokens 1..L-1 under the current weights (one forward each, T=1)."""
        res = []
        for q in sequences:
            ids = torch.tensor([q], device=self.device)
            logp = self.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [L-1, V]
            res.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
        return res

    # ----- weights ---------------------------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        self._loaded: set[str] = set()

    @torch.no_grad()
    def load_weight_bucket(self, header: list, flat: torch.Tensor) -> None:
        """Copy each HF-named tensor into the parameter of that name (``flat`` is reused afterwards: copies only).
        The learner stages tensors in this model's dtype (``weight_dtype``), or narrower when widening is exact (a bf16
        learner, an fp32 engine): ``copy_`` casts."""
        from megatron_async_rlhf.weights.sync import unpack

        for name, t in unpack(header, flat):
            canon = self.aliases.get(name, name)
            p = self.params.get(canon)
            if p is None:
                raise ValueError(f"weight {name!r} is not a parameter of the hf rollout model "
                                 f"({type(self.model).__name__}); the learner's HF names and this model disagree")
            if not t.is_floating_point():
                raise ValueError(f"weight {name!r} arrived as {t.dtype}, not a floating-point dtype")
            if p.shape != t.shape:
                raise ValueError(f"weight {name!r}: received shape {tuple(t.shape)}, the model has {tuple(p.shape)}")
            if canon in self._loaded and canon == name:
                raise ValueError(f"weight {name!r} received twice in one update")
            p.copy_(t)
            self._loaded.add(canon)

    def finish_weight_update(self) -> dict:
        """Every parameter must have been replaced: a partial update would sample from a mix of two versions."""
        missing = sorted(set(self.params) - self._loaded)
        if missing:
            raise ValueError(f"weight update incomplete: {len(missing)} parameter(s) not received, e.g. {missing[:5]}")
        return {"tensors": len(self._loaded), "worker_pids": [os.getpid()], "peak_extra_by_process": {}}

    def close(self) -> None:
        self.model = None
        self.params = {}


def _pick(logits: torch.Tensor, s: SamplingSettings, g: torch.Generator) -> tuple[int, float]:
    """One token from one row of logits [V] and its log-prob under the distribution it was drawn from."""
    if s.temperature == 0:  # greedy: vLLM reports the log-softmax of the raw logits
        logp = logits.log_softmax(-1)
        t = int(logits.argmax())
        return t, float(logp[t])
    x = logits / s.temperature
    if s.top_p < 1:  # vLLM's rule: drop the smallest tokens whose cumulative probability stays <= 1 - top_p
        srt, idx = x.sort(descending=False)
        drop = srt.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[-1] = False  # keep at least one
        x = x.scatter(0, idx, srt.masked_fill(drop, float("-inf")))
    logp = x.log_softmax(-1)
    t = int(torch.multinomial(logp.exp(), 1, generator=g))
    return t, float(logp[t])


def _eos_ids(model, path: str) -> set[int]:
    """The ids that end a sample besides the request's stop tokens, as vLLM takes them: the tokenizer's EOS and the
    generation config's ``eos_token_id`` (an int or a list)."""
    ids = set()
    for v in (getattr(model.generation_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        ids |= set(v) if isinstance(v, (list, tuple)) else ({v} if v is not None else set())
    try:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(path).eos_token_id
        if eos is not None:
            ids.add(eos)
    except (OSError, ValueError):
        pass  # a directory without a tokenizer: the config's ids
    return ids
