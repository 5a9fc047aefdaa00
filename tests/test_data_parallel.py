"""Data-parallel RL and SFT (learner/step.py, schedules/rounds.py, modes/sft.py): each learner DP replica trains its
own share of a batch, and DP=n gives the DP=1 step.

* One RL step (online DPO, RLOO, PPO-clip, PPO with a critic) and one SFT warm-start step on the same batch at DP2
  (TP2 x DP2, PP2 x DP2) and DP4 give the loss, the other logged metrics, the gradient and the updated weights of
  the same step at DP1 (TP2 x PP2 over the same 4 processes), to fp32 reduction-order noise.
* Every forward and backward a replica runs (reference, old log-probs, critic values, policy and critic steps) holds
  its own rows only: the replicas' rows are disjoint and together are the batch's rows.
* The schedule sends each non-controller rank only its replica's rows of each mini-batch.

The RL batch reaches ``rl_step`` through the schedule (``Rounds`` with a stand-in engine pool), as in a run. Its
rewards tie on the last two prompts, so at DP4 one replica has no DPO pair and joins the step with a stand-in that
adds nothing.
"""

import random
from types import SimpleNamespace

import pytest
import torch
from test_schedule import _Prompts  # the fake prompt stream of the schedule's tests

PROMPTS, K = 8, 2
ALGORITHMS = ("online_dpo", "rloo", "ppo", "ppo_critic")
REL = 1e-5


def test_replica_shares_split_a_batch_into_balanced_contiguous_blocks():
    from megatron_async_rlhf.learner.step import replica_share

    for n, dp in ((8, 2), (8, 3), (7, 4), (5, 5)):
        shares = [replica_share(n, dp, d) for d in range(dp)]
        assert [i for s in shares for i in s] == list(range(n))  # contiguous, in order, every unit once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="cannot give each of 4 data-parallel replicas"):
        replica_share(3, 4, 0)


def _samples(vocab: int, seed: int = 5):
    """``PROMPTS x K`` samples (prompt-major, every sequence distinct, no token 0: the padding id) and rewards (the
    last two prompts tie)."""
    g = torch.Generator().manual_seed(seed)
    samples, rewards = [], []
    for p in range(PROMPTS):
        prompt = torch.randint(1, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for j in range(K):
            n = int(torch.randint(2, 12, (1,), generator=g))
            samples.append(SimpleNamespace(prompt_index=p, prompt_ids=prompt, version=0,
                                           token_ids=torch.randint(1, vocab, (n,), generator=g).tolist(),
                                           logprobs=(-torch.rand(n, generator=g) * 3).tolist()))
            rewards.append(0.5 if p >= PROMPTS - 2 else float(j == p % K) + 0.1 * p)
    return samples, torch.tensor(rewards)


class _Engines:
    """The rollout pool as the schedule sees it: rank 0 (the controller) collects ``samples``."""

    def __init__(self, samples, controller: bool):
        self.samples, self.ctx = samples, SimpleNamespace(is_controller=controller)

    def submit_generate(self, prompts, sampling, rows=None):
        pass

    def collect(self):
        return self.samples

    def sync_weights(self, model, info, mcfg, version):
        return {}


def _mini_batches(samples, m: int = 1, steps: int = 1):
    """What ``Rounds.run`` hands this rank: each mini-batch as the schedule deals it out."""
    import torch.distributed as dist

    from megatron_async_rlhf.rollout.base import SamplingSettings
    from megatron_async_rlhf.schedules import ENGINES_IDLE
    from megatron_async_rlhf.schedules.rounds import Rounds

    controller = dist.get_rank() == 0
    sched = Rounds(_Engines(samples if controller else None, controller), None,
                   _Prompts(len({s.prompt_index for s in samples})), SamplingSettings(n=K), steps, 0, m)
    return [mb for mb in sched.run() if mb is not ENGINES_IDLE]


class _Recorder:
    """Records the rows (token sequences, right padding stripped) of every forward and training step this rank runs,
    by kind."""

    def __init__(self):
        import megatron_async_rlhf.learner.forward as F
        import megatron_async_rlhf.learner.step as S
        import megatron_async_rlhf.learner.train as T

        self.rows: dict[str, list] = {}
        self._undo = []
        for mod, name, kind, arg in ((S, "forward_collect", "forward", 1), (F, "forward_collect", "forward", 1),
                                     (S, "train_step", "train", 2), (T, "train_step", "train", 2)):
            self._patch(mod, name, kind, arg)

    def _patch(self, mod, name, kind, arg):
        """``mod.name`` recording the rows of its argument ``arg`` (micro-batches: token tensors or dicts)."""
        real = getattr(mod, name)

        def wrapper(*a, **kw):
            for m in a[arg]:
                for row in (m if torch.is_tensor(m) else m["tokens"]).tolist():
                    while row and row[-1] == 0:
                        row.pop()
                    self.rows.setdefault(kind, []).append(tuple(row))
            return real(*a, **kw)

        setattr(mod, name, wrapper)
        self._undo.append((mod, name, real))

    def close(self):
        for mod, name, real in self._undo:
            setattr(mod, name, real)


def _full(model, info, mcfg):
    """The whole model as HF tensors (every rank), TP-gathered per stage, the stages' and replicas' parts merged."""
    import torch.distributed as dist

    from megatron_async_rlhf.weights.gather import stage_hf_tensors

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.to("cpu", copy=True) for k, v in stage_hf_tensors(model, info, mcfg,
                                                                                           torch.float32)})
    return {k: v for part in parts for k, v in part.items()}


def _smooth_adam(opt) -> None:
    """Adam's first step is ``lr * g / (|g| + eps)``: with the default eps (1e-8) a coordinate whose gradient is ~0
    moves by +-lr on rounding noise, so updated weights could not be compared to 1e-5. With eps = 1 the update is a
    smooth function of the gradient (~ lr * g)."""
    for g in opt.param_groups:
        g["eps"] = 1.0


def _gradients(model, info, mcfg):
    """The full gradient (DP-reduced ``main_grad``) in HF layout, gathered like the weights (on rank 0)."""
    saved = [p.data.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(p.main_grad)
    out = _full(model, info, mcfg)
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.data.copy_(s)
    return out


def _rl_job(hf_dir: str, tp: int, pp: int):
    """Per algorithm, one RL step from the same weights on the same batch: metrics, rows each kind of pass ran on
    this rank, and (rank 0) the full gradient and updated weights."""
    import torch.distributed as dist

    from megatron_async_rlhf.config import AlgorithmConfig
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.critic import build_critic
    from megatron_async_rlhf.learner.model import build_model
    from megatron_async_rlhf.learner.parallel import ranks
    from megatron_async_rlhf.learner.step import rl_step
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training

    out = {"algorithms": {}}
    for name in ALGORITHMS:
        mcfg, model, info = model_from_hf(hf_dir, tp, pp, dtype=torch.float32)
        out.update(dp=ranks()["dp"], dp_rank=ranks()["dp_rank"])
        ac = AlgorithmConfig(name=name, samples_per_prompt=K, micro_batch=3, lr=0.1, clip_grad=0.0)
        ddp, opt = wrap_for_training(model, OptimConfig(lr=ac.lr, clip_grad=0.0))
        _smooth_adam(opt)
        ref, _ = build_model(mcfg, dtype=torch.float32, init=False)
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():  # a reference that differs from the policy: KL and DPO terms are not trivially 0;
            for p in ref.parameters():  # the norms (whole on every TP rank): the same change in every layout
                if not getattr(p, "tensor_model_parallel", False):
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        ref.requires_grad_(False)
        cfg = SimpleNamespace(algorithm=ac, reward=SimpleNamespace(kind="math"),
                              learner=SimpleNamespace(params_dtype=torch.float32, recompute="none",
                                                      distributed_optimizer=False))
        critic = build_critic(cfg, mcfg, model)
        samples, rewards = _samples(mcfg.vocab_size)
        (mb,) = _mini_batches(samples)
        rec = _Recorder()
        try:
            m = rl_step(mb, rewards, ac, ddp, opt, ref, mcfg.vocab_size, critic=critic)
        finally:
            rec.close()
        weights = _full(model, info, mcfg)
        grads = _gradients(model, info, mcfg)
        seqs = {tuple(s.prompt_ids + s.token_ids): i for i, s in enumerate(samples)}
        trained = {kind: sorted({seqs[r] for r in rows}) for kind, rows in rec.rows.items()}
        out["algorithms"][name] = {"metrics": {k: v for k, v in m.items() if isinstance(v, float)}, "rows": trained,
                                   "weights": weights if dist.get_rank() == 0 else None,
                                   "grads": grads if dist.get_rank() == 0 else None}
    return out


def _sft_job(hf_dir: str, tp: int, pp: int):
    """One warm-start step (modes/sft.warm_start) from the same weights: its logged metrics, the rows this rank
    trained, and (rank 0) the updated weights."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.parallel import ranks
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training
    from megatron_async_rlhf.modes.sft import warm_start

    mcfg, model, info = model_from_hf(hf_dir, tp, pp, dtype=torch.float32)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=0.1, clip_grad=0.0))
    _smooth_adam(opt)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    rng = random.Random(3)
    rows = [SimpleNamespace(answer=str(rng.randint(0, 99))) for _ in range(40)]
    data = SimpleNamespace(tok=tok, stops=[tok.eos_token_id], rng=random.Random(0), train_rows=rows,
                           train_ids=[tok(f"Q: {i}+{i}= A:", add_special_tokens=False)["input_ids"]
                                      for i in range(40)])
    cfg = SimpleNamespace(sft=SimpleNamespace(steps=1, batch_size=12),
                          learner=SimpleNamespace(max_tokens_per_micro_batch=0))
    logged = []
    metrics = SimpleNamespace(log=lambda step, phase, **kw: logged.append(kw))
    rec = _Recorder()
    try:
        warm_start(cfg, data, SimpleNamespace(ddp=ddp, opt=opt, mcfg=mcfg), metrics if dist.get_rank() == 0 else None)
    finally:
        rec.close()
    prompt_of = {tuple(ids): i for i, ids in enumerate(data.train_ids)}  # distinct prompts: a row's prompt names it
    trained = sorted(next(i for p, i in prompt_of.items() if r[:len(p)] == p) for r in rec.rows["train"])
    weights = _full(model, info, mcfg)
    return {"dp": ranks()["dp"], "dp_rank": ranks()["dp_rank"], "metrics": logged[0] if logged else None,
            "rows": trained, "weights": weights if dist.get_rank() == 0 else None}


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    scale = max(v.abs().max().item() for v in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a) / scale
    assert worst < REL, f"{what}: max |diff| / max |value| = {worst:.2e}"


def _assert_split(per_rank: list[dict], rows_of, all_rows: list[int], what: str) -> None:
    """Ranks of one replica ran the same rows; the replicas' rows together are ``all_rows`` (as a multiset: no row
    twice, none left out)."""
    by_replica: dict[int, list] = {}
    for r in per_rank:
        mine = rows_of(r)
        assert by_replica.setdefault(r["dp_rank"], mine) == mine, f"{what}: ranks of replica {r['dp_rank']} differ"
    union = [i for rows in by_replica.values() for i in rows]
    assert sorted(union) == sorted(all_rows), \
        f"{what}: replicas' rows {by_replica} are not a split of the batch's {all_rows}"


LAYOUTS = [(2, 1), (1, 2), (1, 1)]  # TP2 x DP2, PP2 x DP2, DP4; DP1 is TP2 x PP2


@pytest.fixture(scope="module")
def rl_runs(pool, tiny_models):
    return {(tp, pp): pool.run(_rl_job, tiny_models["tiny-gqa"], tp, pp) for tp, pp in [(2, 2)] + LAYOUTS}


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_rl_step_at_dp_n_is_the_dp1_step(rl_runs, name, tp, pp):
    one, many = rl_runs[(2, 2)], rl_runs[(tp, pp)]
    assert one[0]["dp"] == 1 and many[0]["dp"] == 4 // (tp * pp)
    a, b = one[0]["algorithms"][name], many[0]["algorithms"][name]
    skip = {"pad_fraction", "micro_batches"}  # these depend on how the rows are split
    assert set(a["metrics"]) == set(b["metrics"])
    for k in set(a["metrics"]) - skip:
        # abs: DPO's margins and implicit rewards are differences of fp32 log-prob sums ~ 30 (last bits differ
        # between TP layouts), which cancel
        assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=REL, abs=1e-5), k
    for r in many:  # every rank logs the batch's numbers (rank 0 is the controller, the last stage computes them)
        assert r["algorithms"][name]["metrics"] == b["metrics"]
    _assert_close(a["grads"], b["grads"], f"{name} gradient")
    _assert_close(a["weights"], b["weights"], f"{name} updated weights")


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 2)] + LAYOUTS)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_each_replica_runs_its_own_rows(rl_runs, name, tp, pp):
    per_rank = rl_runs[(tp, pp)]
    rows = list(range(PROMPTS * K)) if name != "online_dpo" else [
        p * K + j for p in range(PROMPTS - 2) for j in range(K)]  # the last two prompts tie: no pair
    kinds = per_rank[0]["algorithms"][name]["rows"].keys()
    assert "forward" in kinds and "train" in kinds
    for kind in kinds:
        # a replica whose prompts all tie runs a stand-in of its own rows (empty loss mask): not a row it trains
        def real(r, kind=kind):
            return [i for i in r["algorithms"][name]["rows"][kind] if i in rows]

        _assert_split(per_rank, real, rows, f"{name} {kind} at tp{tp} pp{pp}")


@pytest.mark.multiproc
def test_sft_warm_start_at_dp_n_is_the_dp1_step(pool, tiny_models):
    runs = {(tp, pp): pool.run(_sft_job, tiny_models["tiny-gqa"], tp, pp) for tp, pp in [(2, 2), (2, 1), (1, 1)]}
    one = runs[(2, 2)][0]
    assert one["dp"] == 1 and len(one["rows"]) == 12
    for (tp, pp), per_rank in runs.items():
        m = per_rank[0]["metrics"]
        assert m["loss"] == pytest.approx(one["metrics"]["loss"], rel=REL)
        assert m["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=REL)
        _assert_close(one["weights"], per_rank[0]["weights"], f"sft tp{tp} pp{pp} weights")
        _assert_split(per_rank, lambda r: r["rows"], one["rows"], f"sft tp{tp} pp{pp}")


def _deal_job(tp: int, pp: int, m: int):
    """The rows of each mini-batch the schedule hands this rank (positions of its non-None samples)."""
    from megatron_async_rlhf.learner.parallel import init_learner_parallel, ranks

    init_learner_parallel(tp, pp)
    samples = [SimpleNamespace(prompt_index=p, version=0) for p in range(PROMPTS * m) for _ in range(K)]
    mbs = _mini_batches(samples, m, m)
    return {"dp": ranks()["dp"], "dp_rank": ranks()["dp_rank"],
            "held": [[i for i, s in enumerate(mb.samples) if s is not None] for mb in mbs]}


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp,m", [(1, 1, 2), (2, 1, 1), (1, 2, 2)])
def test_the_schedule_sends_each_replica_only_its_rows(pool, tp, pp, m):
    from megatron_async_rlhf.learner.step import replica_share

    per_rank = pool.run(_deal_job, tp, pp, m)
    dp = per_rank[0]["dp"]
    assert dp == 4 // (tp * pp) and all(len(r["held"]) == m for r in per_rank)
    assert all(h == list(range(PROMPTS * K)) for h in per_rank[0]["held"])  # the controller holds (and scores) all
    for rank, r in enumerate(per_rank[1:], 1):
        share = replica_share(PROMPTS, dp, r["dp_rank"])
        assert r["held"] == [[i for i in range(PROMPTS * K) if i // K in share]] * m, rank
    for j in range(m):
        _assert_split([r for r in per_rank[1:]] + [{**per_rank[0], "held": [
            [i for i in range(PROMPTS * K) if i // K in replica_share(PROMPTS, dp, 0)]] * m}],
                      lambda r: r["held"][j], list(range(PROMPTS * K)), f"mini-batch {j}")
