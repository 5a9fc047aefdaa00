"""schedule=fully_async (schedules/fully_async.py): the staleness bound and exactly-once training under randomized
generation lengths and finish order (a fake engine pool, in process), the config's checks, and the tiny recipe end to
end with real Megatron and real vLLM streaming (subprocesses)."""

import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.rollout.base import FinishedGroup, Sample, SamplingSettings
from megatron_async_rlhf.schedules import ENGINES_IDLE, StalenessError


class _Engines:
    """A pool of fake streaming engines. Each admitted sample needs a random number of engine steps (its length);
    the engines run a random number of steps between the controller's commands (as the real server steps between
    them), every step samples one token of every unfinished sample with the version the engine holds, and a group
    comes back once all its samples are done. ``lie``: report every sample one version older than it is."""

    class ctx:
        is_controller = True

    def __init__(self, engines=2, seed=0, max_len=12, lie=0):
        self.engines, self.rng, self.max_len, self.lie = engines, random.Random(seed), max_len, lie
        self.version = 0
        self.flight = [dict() for _ in range(engines)]  # engine -> group id -> (group dict, [tokens' versions] per sample)
        self.ready = [[] for _ in range(engines)]
        self.admitted, self.returned = [], []
        self.last_collect = {}
        self.busy = [0.0] * engines

    def _steps(self, e, n):
        for _ in range(n):
            for gid, (g, toks, lens) in list(self.flight[e].items()):
                for t, n_tok in zip(toks, lens):
                    if len(t) < n_tok:
                        t.append(self.version)
                self.busy[e] += 1.0
                if all(len(t) == n_tok for t, n_tok in zip(toks, lens)):
                    del self.flight[e][gid]
                    self.ready[e].append(FinishedGroup(gid, [self._sample(g, t) for t in toks]))

    def _sample(self, g, toks):
        spans, start = [], 0
        for i in range(1, len(toks) + 1):
            if i == len(toks) or toks[i] != toks[start]:
                spans.append((toks[start] - self.lie, start, i))
                start = i
        return Sample(g["index"], g["prompt"], [0] * len(toks), [0.0] * len(toks), "stop",
                      min(v for v, _, _ in spans), versions=spans)

    def admit(self, e, groups):
        for g in groups:
            assert g["id"] not in self.admitted, "admitted twice"
            self.admitted.append(g["id"])
            k = g["sampling"].n
            self.flight[e][g["id"]] = (g, [[] for _ in range(k)], [self.rng.randint(1, self.max_len) for _ in range(k)])
        self._steps(e, self.rng.randint(0, 3))

    def poll(self, e, wait=False, until=None):
        self._steps(e, self.rng.randint(0, 4))
        while wait and self.flight[e] and (set(until) & set(self.flight[e]) if until else not self.ready[e]):
            self._steps(e, 1)
        out, self.ready[e] = self.ready[e], []
        self.returned += [g.group_id for g in out]
        return {"groups": out, "in_flight": len(self.flight[e]), "busy_s": self.busy[e], "up_s": self.busy[e] * 2,
                "reward_s": 0.0}

    def sync_weights(self, model, info, mcfg, version):
        for e in range(self.engines):  # the learner trained meanwhile: the engines generated
            self._steps(e, self.rng.randint(0, 6))
        assert version == self.version + 1, "a push after every optimizer step"
        self.version = version
        return {"buckets": 1}


class _Prompts:
    """Round r: P prompts [r * 1000 + j] (rows the same numbers), seed 500 + r."""

    def __init__(self, per):
        self.per_round = per

    def round(self, r):
        return [[r * 1000 + j] for j in range(self.per_round)], [r * 1000 + j for j in range(self.per_round)]

    def seed(self, r):
        return 500 + r


def _run(monkeypatch, n, steps=10, per=3, k=2, **engine_kw):
    from megatron_async_rlhf.schedules import rounds
    from megatron_async_rlhf.schedules.fully_async import FullyAsync

    monkeypatch.setattr(rounds.dist, "get_world_size", lambda: 1)  # one learner rank: nothing to deal out
    eng = _Engines(**engine_kw)
    sched = FullyAsync(eng, SimpleNamespace(model=None, info=None, mcfg=None), _Prompts(per),
                       SamplingSettings(n=k), steps, n)
    batches = []
    for mb in sched.run():
        if mb is ENGINES_IDLE:
            assert eng.version == sched.version
            continue
        t = mb.index
        assert t == sched.version - 1 == len(batches)
        groups = [s.prompt_ids[0] for s in mb.samples[::k]]
        assert groups == [t * 1000 + j for j in range(per)]  # FIFO: step t trains groups [tP, (t+1)P), in order
        assert [s.prompt_index for s in mb.samples] == [j for j in range(per) for _ in range(k)]
        assert mb.meta == groups  # each sample's row is its prompt's
        for s in mb.samples:  # the bound, checked here independently of the schedule's own assertion
            assert 0 <= t - s.version <= n and s.newest_version <= t
        assert mb.stats["staleness_max"] == max(t - s.version for s in mb.samples) <= n
        assert mb.stats["version_spread"] == (max(s.newest_version for s in mb.samples)
                                              - min(s.version for s in mb.samples))
        batches.append(mb.stats)
    return sched, eng, batches


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [0, 1, 3])
def test_staleness_bound_and_exactly_once_under_random_lengths(monkeypatch, n, seed):
    steps, per = 10, 3
    sched, eng, batches = _run(monkeypatch, n, steps, per, seed=seed, engines=1 + seed % 3)
    assert len(batches) == steps and sched.stats.trained == steps and sched.stats.syncs == steps - 1
    total = steps * per
    # every admitted group was generated once, returned once and trained once; nothing is left in flight
    assert sorted(eng.admitted) == sorted(eng.returned) == list(range(total))
    assert not any(eng.flight) and not any(eng.ready)
    assert sched.admitted == sched.trained_groups == total
    if n == 0:  # synchronous: every token from the weights it is trained on
        assert all(b["staleness_max"] == 0 and b["version_spread"] == 0 for b in batches)
    assert max(sched.stats.staleness) <= n


def test_async_runs_ahead_and_mixes_versions(monkeypatch):
    """With a bound of 2, groups are generated ahead (staleness reaches the bound) and long ones straddle pushes."""
    spreads, stale = [], []
    for seed in range(4):
        _, _, batches = _run(monkeypatch, 2, 12, 3, seed=seed, max_len=30)
        spreads += [b["version_spread"] for b in batches]
        stale += [b["staleness_max"] for b in batches]
    assert max(spreads) > 0 and max(stale) == 2


def test_admission_is_bounded_by_the_engines_version(monkeypatch):
    """Before any push only the first (max_staleness + 1) steps' groups are admitted."""
    from megatron_async_rlhf.schedules import rounds
    from megatron_async_rlhf.schedules.fully_async import FullyAsync

    monkeypatch.setattr(rounds.dist, "get_world_size", lambda: 1)
    eng = _Engines()
    sched = FullyAsync(eng, SimpleNamespace(model=None, info=None, mcfg=None), _Prompts(4), SamplingSettings(n=2),
                       10, 2)
    it = sched.run()
    next(it)  # step 0 handed out
    assert sorted(eng.admitted) == list(range(12))  # steps 0, 1, 2 (bound 2 at engine version 0)
    assert next(it) is ENGINES_IDLE and next(it).index == 1
    assert sorted(eng.admitted) == list(range(16))  # the push to v1 let step 3's groups in


@pytest.mark.parametrize("n", [0, 2])
def test_resume_generates_the_untrained_groups_again_and_trains_each_once(monkeypatch, n):
    """A checkpoint after step 4 keeps no group; the resumed schedule pushes first, admits groups 4P.. again and
    trains steps 4..9: every group trained exactly once over the two runs."""
    from megatron_async_rlhf.schedules import rounds
    from megatron_async_rlhf.schedules.fully_async import FullyAsync

    monkeypatch.setattr(rounds.dist, "get_world_size", lambda: 1)
    per, k, steps = 3, 2, 10
    policy = SimpleNamespace(model=None, info=None, mcfg=None)
    trained = []

    def run(sched, eng, stop_after=None):
        for mb in sched.run():
            if mb is ENGINES_IDLE:
                continue
            trained.extend(s.prompt_ids[0] for s in mb.samples[::k])
            assert all(mb.index - s.version <= n for s in mb.samples)
            if mb.index + 1 == stop_after:
                return sched.checkpoint_state()

    first = _Engines(seed=1)
    state, saved = run(FullyAsync(first, policy, _Prompts(per), SamplingSettings(n=k), steps, n), first, 4)
    assert state["version"] == 4 and saved is None and state["stats"]["trained"] == 4
    assert len(first.admitted) == (4 + n) * per  # admitted ahead of the checkpoint: dropped, generated again
    second = _Engines(seed=2)
    second.version = 3  # (the fake checks every push is the next version: the resumed push is v4)
    sched = FullyAsync(second, policy, _Prompts(per), SamplingSettings(n=k), steps, n, resume=(state, saved))
    run(sched, second)
    assert trained == [t * 1000 + j for t in range(steps) for j in range(per)]  # each group once, in order
    assert sorted(second.admitted) == list(range(4 * per, steps * per))
    assert sched.stats.trained == steps and sched.stats.syncs == state["stats"]["syncs"] + 6


def test_a_sample_older_than_the_bound_is_refused(monkeypatch):
    with pytest.raises(StalenessError, match="max_staleness"):
        _run(monkeypatch, 0, lie=1)


def test_config_checks():
    from megatron_async_rlhf.config import RunConfig
    from megatron_async_rlhf.schedules import SCHEDULES, schedule_class
    from megatron_async_rlhf.schedules.fully_async import FullyAsync
    from megatron_async_rlhf.schedules.rounds import Rounds
    from megatron_async_rlhf.train import load_config

    assert tuple(SCHEDULES) == RunConfig.SCHEDULES  # the config's names are the registry's
    assert schedule_class("rounds") is Rounds and schedule_class("fully_async") is FullyAsync

    assert load_config([]).schedule == "rounds" and load_config([]).rollout.in_flight_kv == "recompute"
    cfg = load_config(["schedule=fully_async", "rollout.in_flight_kv=keep"])
    assert cfg.schedule == "fully_async" and cfg.rollout.in_flight_kv == "keep"
    for bad, match in [(["schedule=nope"], "schedule='nope'"),
                       (["schedule=fully_async", "rollout.backend=hf"], "rollout.backend=vllm"),
                       (["schedule=fully_async", "algorithm.off_policy_n=2", "algorithm.steps=4"], "off_policy_n=1"),
                       (["rollout.in_flight_kv=both"], "in_flight_kv")]:
        with pytest.raises(ConfigError, match=match):
            load_config(bad)


# ----- the tiny recipe end to end: real learner, real vLLM streaming ----------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main_job(out, *overrides, schedule="fully_async"):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "megatron_async_rlhf", f"logging.out_dir={out}",
                           "logging.wandb_mode=disabled", f"schedule={schedule}", "pin_cpus=false", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if r["phase"] == "rl"], [r for r in rows if r["phase"] == "eval"]


@pytest.mark.multiproc
def test_tiny_recipe_fully_async(tmp_path):
    """The tiny recipe's warm start, then 24 fully asynchronous steps with a bound of 2 and an evaluation every 8
    (its request runs beside the groups in flight)."""
    rl, evals = _main_job(tmp_path, "sft.steps=20", "algorithm.steps=24", "data.eval_size=32",
                          "algorithm.max_staleness=2", "eval.every=8")
    assert [r["step"] for r in rl] == list(range(1, 25))  # every step logged once, in order
    assert all(r["staleness_max"] <= 2 and r["staleness_p50"] <= r["staleness_p90"] <= r["staleness_max"]
               for r in rl)
    assert max(r["staleness_max"] for r in rl) == 2  # the engines ran ahead as far as allowed
    assert all(r["version"] == r["step"] and 0 <= r["engine_busy_frac"] <= 1 for r in rl)
    assert all(r["reward_mean"] == r["reward_mean"] for r in rl)  # logged, finite
    assert [e["step"] for e in evals] == [0, 8, 16, 24]


@pytest.mark.multiproc
def test_long_completions_straddle_weight_pushes(tmp_path):
    """No warm start: the tiny model rarely stops, so its 40-token completions are still running when the next
    weights arrive; with in_flight_kv=keep they continue under them and carry two versions (version_spread > 0).
    (The warm-started recipe answers in a few tokens, which finish before the next push: its spread is 0.)"""
    rl, _ = _main_job(tmp_path, "sft.steps=0", "algorithm.steps=8", "data.eval_size=8", "algorithm.max_staleness=2",
                      "algorithm.max_new_tokens=40", "rollout.in_flight_kv=keep")
    assert [r["step"] for r in rl] == list(range(1, 9))
    assert all(r["version_spread"] <= r["staleness_max"] <= 2 for r in rl)
    assert max(r["version_spread"] for r in rl) >= 1
    assert max(r.get("sync_in_flight_groups", 0) for r in rl) > 0  # a push reached groups in flight


@pytest.mark.multiproc
def test_checkpoint_and_resume(tmp_path):
    """A run of 3 steps checkpoints at its end; resumed to 6 steps it pushes the checkpoint's weights, generates the
    groups of steps 4-6 and logs each step once."""
    common = ["sft.steps=0", "data.eval_size=8", "algorithm.max_staleness=1", "checkpoint.every=3"]
    rl, _ = _main_job(tmp_path, *common, "algorithm.steps=3")
    assert [r["step"] for r in rl] == [1, 2, 3]
    from megatron_async_rlhf.run_state import complete_checkpoints

    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [3]
    rl, _ = _main_job(tmp_path, *common, "algorithm.steps=6", "resume=auto")
    assert [r["step"] for r in rl] == [1, 2, 3, 4, 5, 6]  # the resumed run appends steps 4-6, each once
    assert all(r["staleness_max"] <= 1 and r["version"] == r["step"] for r in rl)
    assert rl[3]["staleness_max"] == 0  # step 4's groups were generated again, by the resumed weights


@pytest.mark.multiproc
def test_without_straddling_it_trains_what_one_step_rounds_trains(tmp_path):
    """max_staleness=1 with the warm-started recipe's short answers: every group of step t is generated whole by
    v(t-1) from the prompts and seeds the round schedule gives step t, so the two schedules train the same numbers.
    A push that meets groups in flight (a slow engine) makes later samples legitimately differ: the steps are compared
    up to the first one whose groups straddled a push (step 1's groups are generated before any push: always one)."""
    common = ["sft.steps=20", "algorithm.steps=8", "data.eval_size=8", "algorithm.max_staleness=1"]
    fa, _ = _main_job(tmp_path / "fa", *common)
    rounds, _ = _main_job(tmp_path / "rounds", *common, schedule="rounds")
    timing = {"wall_s", "gen_s", "train_s", "reward_s", "reward_wait_s", "sync_seconds", "sync_gbps", "engine_load_s",
              "engine_peak_extra_bytes", "learner_wait_frac"}
    assert len(fa) == len(rounds) == 8
    straddled = [i for i, r in enumerate(fa) if r["version_spread"] or r.get("sync_in_flight_groups")]
    compared = straddled[0] if straddled else len(fa)
    assert compared >= 1
    for a, b in zip(fa[:compared], rounds[:compared]):
        same = (a.keys() & b.keys()) - timing
        assert {"reward_mean", "loss", "grad_norm", "kl_ref", "staleness", "batch_version"} <= same
        assert {k: a[k] for k in same} == {k: b[k] for k in same}


# ----- engine restarts while streaming (rollout/server.py's _Streaming with a real supervisor, fake engines) ------
class EngineDeadError(RuntimeError):
    """Named as vLLM's: the supervisor takes it for a dead engine core."""


class _StreamingEngine:
    """A fake streaming engine: group g needs ``1 + g % 3`` engine steps; ``die_at``: the engine step that raises
    EngineDeadError (counted from 1)."""

    def __init__(self, die_at=None):
        self.die_at, self.steps, self.version = die_at, 0, 0
        self.left: dict[int, int] = {}
        self.admitted: list[int] = []

    def admit(self, group_id, prompt, sampling, prompt_index=None):
        assert group_id not in self.left
        self.left[group_id] = 1 + group_id % 3
        self.admitted.append(group_id)

    def in_flight(self):
        return len(self.left)

    def step(self):
        self.steps += 1
        if self.steps == self.die_at:
            raise EngineDeadError("engine core died")
        done = []
        for g in list(self.left):
            self.left[g] -= 1
            if self.left[g] == 0:
                del self.left[g]
                done.append(FinishedGroup(g, [Sample(g, [g], [0], [0.0], "stop", self.version)]))
        return done


def _streaming_server(engines, max_restarts):
    from megatron_async_rlhf.rollout.server import _Streaming
    from megatron_async_rlhf.rollout.supervisor import EngineSupervisor

    sent = []
    ctx = SimpleNamespace(role=SimpleNamespace(engine=0), session="s", reward_bridge=None,
                          store=SimpleNamespace(add=lambda key, n: 0),
                          control=SimpleNamespace(send_obj=lambda obj, dst, what: sent.append(obj)))
    sup = EngineSupervisor(lambda: engines.pop(0), lambda: None, 0, max_restarts, None)
    return _Streaming(ctx, sup, None, "recompute", lambda event: sent.append(event)), sup, sent


def test_streaming_restart_admits_the_groups_in_flight_again_and_returns_each_once():
    """A death at engine step 2 between commands: the group finished at step 1 (not yet polled) is kept, the others
    are admitted again on the new engine (which holds the dead one's version); the restart events are held back until
    the next answer and sent before it; every group comes back exactly once."""
    first, second = _StreamingEngine(die_at=2), _StreamingEngine()
    streaming, sup, sent = _streaming_server([first, second], max_restarts=1)
    sup.version = 3  # the newest weights the dead engine had loaded
    groups = [{"id": g, "prompt": [g], "index": g, "sampling": SamplingSettings(n=1), "row": None} for g in range(6)]
    stats = {"samples": 0}
    with streaming.answering_to("admit"):
        streaming.command({"cmd": "admit", "groups": groups}, stats)
    streaming.step()  # groups 0 and 3 finish
    streaming.step()  # the engine dies: restarted, the 4 groups in flight admitted again
    assert sup.engine is second and second.version == 3 and sup.restarts == 1
    assert second.admitted == [1, 2, 4, 5] and sent == []  # nobody is listening between commands: held back
    returned = []
    while streaming.groups or streaming.ready:
        with streaming.answering_to("poll"):
            streaming.command({"cmd": "poll", "wait": True}, stats)
        returned += [g.group_id for g in sent[-1]["groups"]]
    assert [e["event"] for e in sent[:2]] == ["engine_restarting", "engine_restart"]
    assert sent[1]["while"] == "generating (streaming)" and sent[1]["version"] == 3
    assert sorted(returned) == list(range(6)) and stats["samples"] == 6  # each group once


def test_streaming_restart_past_max_restarts_gives_up():
    from megatron_async_rlhf.rollout.supervisor import EngineGaveUp

    streaming, sup, _ = _streaming_server([_StreamingEngine(die_at=1)], max_restarts=0)
    with streaming.answering_to("admit"):
        streaming.command({"cmd": "admit", "groups": [{"id": 0, "prompt": [0], "index": 0,
                                                       "sampling": SamplingSettings(n=1)}]}, {"samples": 0})
    with pytest.raises(EngineGaveUp, match=r"rollout engine 0 failed while generating \(streaming\).*max_restarts=0"):
        streaming.step()


def test_streaming_restart_mid_sync_loads_the_version_being_loaded_and_admits_again():
    """A death while a weight sync is loaded between engine steps: the rest of the stream is still received, the new
    engine loads all of it as the version being synced, and the groups in flight are admitted there again."""
    import torch

    class Loading(_StreamingEngine):
        def __init__(self, die):
            super().__init__()
            self.die, self.loaded = die, []

        def load_weight_stream(self, receive, version):
            for header, flat in receive(lambda n: torch.empty(n, dtype=torch.uint8)):
                if self.die:
                    raise EngineDeadError("engine core died")
                self.loaded.append(bytes(flat))
            self.version = version
            return {"buckets": len(self.loaded)}

        def update_weights_between_steps(self, receive, version, in_flight_kv):
            return {**self.load_weight_stream(receive, version), "in_flight": len(self.left)}

    def receive(alloc):
        for i in range(3):
            buf = alloc(2)
            buf.fill_(i)
            yield [f"bucket{i}"], buf

    first, second = Loading(die=True), Loading(die=False)
    streaming, sup, sent = _streaming_server([first, second], max_restarts=1)
    with streaming.answering_to("admit"):
        streaming.command({"cmd": "admit", "groups": [{"id": g, "prompt": [g], "index": g,
                                                       "sampling": SamplingSettings(n=1)} for g in (1, 2)]}, {})
    with streaming.answering_to("sync"):
        out = sup.load_weights_between_steps(receive, 4, "keep", streaming.notify)
    assert sup.engine is second and sup.version == second.version == 4
    assert second.loaded == [bytes([i, i]) for i in range(3)]  # the whole stream, the buckets after the death too
    assert second.admitted == [1, 2] and out["in_flight"] == 2 and out["buckets"] == 3
    assert [(e["event"], e["while"]) for e in sent] == [("engine_restarting", "loading weights between engine steps"),
                                                          ("engine_restart", "loading weights between engine steps")]
