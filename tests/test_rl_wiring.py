"""The RL wiring end to end against an independent computation: one ``learner/step.rl_step`` (megatron-core, one
gloo process: TP1 PP1 DP1) on a tiny random-weight LLaMA, for online DPO, RLOO and PPO-clip, gives the loss, the
gradient norm and the output layer's gradient of the same loss written out here by hand from plain transformers
(``LlamaForCausalLM`` full forward of each unpadded sample, ``log_softmax(logits / T).gather``); none of the
project's algorithm functions are called for the reference. After that one step (Adam) the fixed best completion is
more likely under the policy (its implicit reward beta * log pi / pi_ref rises) and the loss, re-evaluated at the new
log-probs, is lower.

The batch: 4 prompts x k=4 completions. Prompts 0-2 each hold the same fixed best completion (reward 1, at a
different position in each group) among random ones (rewards below 0.3); prompt 3's rewards all tie (DPO skips it;
its advantages are 0). The sampler's log-probs are the policy's plus noise (an off-policy batch: PPO's importance
weights differ from 1 and some hit the cap); the reference policy is the policy's weights perturbed. Temperature 0.8
and non-default coefficients, so a setting that is not passed through shows up. Micro-batches split the batch
unevenly.

The paper's formulas, as the reference computes them (per sample i: completion log-probs ``logp_it`` of the policy at
temperature T, ``ref_it`` of the reference, ``s_it`` of the sampler; ``r_i`` the reward):

* online DPO: per prompt whose rewards do not all tie, chosen = argmax r, rejected = argmin r;
  ``loss = mean_pairs -log sigmoid(beta * ((sum logp_c - sum ref_c) - (sum logp_r - sum ref_r)))``.
* RLOO: ``R_i = r_i - kl_coef * sum_t (s_it - ref_it)`` (the KL estimate on the sampled tokens, with the log-probs
  of the policy that sampled them), ``A_i = R_i - mean_{j != i in the prompt} R_j``,
  ``loss = -(1/N) sum_i A_i sum_t logp_it``.
* PPO-clip, critic-free, one update per batch: ``A_i = (r_i - mean_p) / (std_p + 1e-6)`` (population std over the
  prompt's k), ``old = logp`` (detached: the policy when the batch arrived), ``w_it = min(exp(old_it - s_it), cap)``,
  ``ratio = exp(logp - old)``, ``loss = sum_it w_it max(-A_i ratio, -A_i clip(ratio, 1-eps, 1+eps)) / #tokens``.

With ``updates_per_batch=2`` PPO's second update is checked too: its ratio against the log-probs before the first
update, where the clip acts (the one-update step's ratio is 1).

Every check must be able to fail: ``test_a_broken_wiring_is_caught`` breaks the code in the worker (monkeypatches:
chosen/rejected swapped, the KL term negated, advantages shifted by one row, the importance weight dropped) and
asserts that the same comparison reports it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

K = 4  # samples per prompt
TEMPERATURE = 0.8
LR = 1e-5
SETTINGS = {  # each algorithm's section, away from the defaults
    "online_dpo": {"beta": 0.3},
    "rloo": {"kl_coef": 0.2},
    "ppo": {"clip_eps": 0.2, "tis_cap": 1.25},
}
MICRO_BATCH = {"online_dpo": 4, "rloo": 6, "ppo": 6}  # DPO: 2 pairs + 1 pair; RLOO/PPO: 6 + 6 + 4 rows
PPO_STD_EPS = 1e-6


# ------------------------------------------------------------------------------------------------ the batch


def _make_batch(vocab: int) -> tuple[list[list[int]], list[list[int]], list[float], list[int]]:
    """(prompts [P], completions [N], rewards [N], indices of the best completion's samples), prompt-major."""
    g = torch.Generator().manual_seed(20)
    best = torch.randint(4, vocab, (5,), generator=g).tolist()
    prompts, completions, rewards, best_rows = [], [], [], []
    for p, (plen, best_at) in enumerate([(4, 1), (6, 3), (3, 0), (5, None)]):
        prompts.append(torch.randint(4, vocab, (plen,), generator=g).tolist())
        others = (torch.randperm(30, generator=g)[:K] / 100).tolist()  # distinct, < 0.3
        for j in range(K):
            if j == best_at:
                completions.append(best)
                rewards.append(1.0)
                best_rows.append(p * K + j)
            else:
                completions.append(torch.randint(4, vocab, (int(torch.randint(2, 7, (1,), generator=g)),),
                                                 generator=g).tolist())
                rewards.append(0.5 if best_at is None else others[j])  # prompt 3: every reward ties
    return prompts, completions, rewards, best_rows


def _hf_completion_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """``[len(completion)]`` log-probs of the completion tokens: full forward of the unpadded sequence,
    ``log_softmax(logits / T)`` at the positions that predict them."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()  # [s, V]
    lp = torch.log_softmax(logits[:-1] / TEMPERATURE, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]  # [s-1]
    return lp[len(prompt) - 1:]


# ------------------------------------------------------------------------ the losses, written out by hand


def _dpo_loss(logp, ref, sampler, rewards, beta, **_):
    losses = []
    for p in range(len(rewards) // K):
        r = rewards[p * K:(p + 1) * K]
        if max(r) == min(r):
            continue  # no preference
        c, j = p * K + r.index(max(r)), p * K + r.index(min(r))
        margin = (logp[c].sum() - ref[c].sum()) - (logp[j].sum() - ref[j].sum())
        losses.append(-F.logsigmoid(beta * margin))
    return torch.stack(losses).mean()


def _rloo_advantages(ref, sampler, rewards, kl_coef):
    shaped = [r - kl_coef * float((s - q).sum()) for r, s, q in zip(rewards, sampler, ref)]
    adv = []
    for i, r in enumerate(shaped):
        group = shaped[(i // K) * K:(i // K + 1) * K]
        adv.append(r - (sum(group) - r) / (K - 1))
    return adv


def _rloo_loss(logp, ref, sampler, rewards, kl_coef, **_):
    adv = _rloo_advantages(ref, sampler, rewards, kl_coef)
    return -sum(a * lp.sum() for a, lp in zip(adv, logp)) / len(logp)


def _ppo_advantages(rewards):
    adv = []
    for i, r in enumerate(rewards):
        group = torch.tensor(rewards[(i // K) * K:(i // K + 1) * K], dtype=torch.float64)
        std = float(((group - group.mean()) ** 2).mean().sqrt())
        adv.append((r - float(group.mean())) / (std + PPO_STD_EPS))
    return adv


def _ppo_loss(logp, ref, sampler, rewards, clip_eps, tis_cap, old=None, **_):
    old = old if old is not None else [lp.detach() for lp in logp]
    total, tokens = 0.0, 0
    for a, lp, o, s in zip(_ppo_advantages(rewards), logp, old, sampler):
        ratio = torch.exp(lp - o)
        w = torch.exp(o - s).clamp(max=tis_cap)
        total = total + (w * torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))).sum()
        tokens += len(lp)
    return total / tokens


LOSSES = {"online_dpo": _dpo_loss, "rloo": _rloo_loss, "ppo": _ppo_loss}


# ---------------------------------------------------------------------- mutations (break the code under test)


def _mutate(mutation: str):
    """Monkeypatch the project in this worker so that its wiring is wrong in one way; returns an undo function."""
    from megatron_async_rlhf.algorithms import online_dpo, ppo, rloo

    undo = []

    def patch(obj, name, new):
        undo.append((obj, name, obj.__dict__[name]))
        setattr(obj, name, new)

    if mutation == "swap_chosen_rejected":
        rows = online_dpo.OnlineDPO.rows

        def swapped(self, rewards):
            order, m = rows(self, rewards)
            return [order[i ^ 1] for i in range(len(order))], m

        patch(online_dpo.OnlineDPO, "rows", swapped)
    elif mutation == "negate_kl":  # RLOO: the KL penalty added to the reward instead of subtracted
        patch(rloo, "kl_penalized_rewards", lambda r, lp, ref, mask, c: r + c * ((lp - ref) * mask).sum(-1))
    elif mutation == "negate_dpo_reference":  # DPO's implicit KL: log pi + log pi_ref instead of log pi - log pi_ref
        loss = online_dpo.online_dpo_loss
        patch(online_dpo, "online_dpo_loss", lambda c, r, rc, rr, *a: loss(c, r, -rc, -rr, *a))
    elif mutation == "shift_advantages":  # row i trained with row i+1's advantage
        for cls in (rloo.RLOO, ppo.PPO):
            adv_fn = cls.advantages

            def shifted(self, mbs, rewards, order, adv_fn=adv_fn):
                out = adv_fn(self, mbs, rewards, order)
                adv = torch.zeros(len(order))
                for m in mbs:
                    adv[m["rows"]] = m["adv"]
                adv = adv.roll(-1)
                for m in mbs:
                    m["adv"] = adv[m["rows"]]
                return out

            patch(cls, "advantages", shifted)
    elif mutation == "drop_importance_weight":  # PPO without the pi_old / pi_sampler correction
        loss = ppo.ppo_clip_loss
        patch(ppo, "ppo_clip_loss", lambda lp, old, s, *a: loss(lp, old, lp.detach() if old is None else old, *a))
    elif mutation != "none":
        raise ValueError(mutation)

    def restore():
        for obj, name, old in reversed(undo):
            setattr(obj, name, old)

    return restore


# ------------------------------------------------------------------------------------ the megatron side


def _completion_logprobs(model, prompts_of_rows, completions, vocab_size):
    """Per sample, its completion tokens' log-probs under the megatron model (one padded forward)."""
    from megatron_async_rlhf.learner.forward import forward_collect, pad_batch
    from megatron_async_rlhf.learner.logprobs import vocab_parallel_logprobs

    seqs = [p + c for p, c in zip(prompts_of_rows, completions)]
    tokens = pad_batch(seqs, len(seqs))
    model.eval()
    (lp,) = forward_collect(model, [tokens], lambda logits, i: vocab_parallel_logprobs(
        logits[:, :-1], tokens[:, 1:], vocab_size, TEMPERATURE))
    return [lp[i, len(p) - 1:len(p) - 1 + len(c)].clone() for i, (p, c) in enumerate(zip(prompts_of_rows,
                                                                                         completions))]


def _rl_job(policy_dir: str, ref_dir: str, name: str, prompts, completions, sampler, rewards, mutation: str,
            updates: int = 1, settings: dict | None = None):
    """One rl_step at DP1; the step's metrics, the output layer's gradient, the policy's log-probs before/after."""
    from megatron_async_rlhf.config import run_config_from_dict
    from megatron_async_rlhf.learner.build import model_from_hf
    from megatron_async_rlhf.learner.step import rl_step
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training

    ac = run_config_from_dict({"algorithm": {
        "name": name, "samples_per_prompt": K, "micro_batch": MICRO_BATCH[name], "temperature": TEMPERATURE,
        "lr": LR, "updates_per_batch": updates, name: settings or SETTINGS[name]}}).validate().algorithm
    cfg, model, _ = model_from_hf(policy_dir, 1, 1, dtype=torch.float32)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=ac.lr, clip_grad=0.0))  # no clipping: the raw gradient
    _, ref, _ = model_from_hf(ref_dir, 1, 1, dtype=torch.float32)
    ref.requires_grad_(False)
    rows_prompts = [prompts[i // K] for i in range(len(completions))]
    samples = [SimpleNamespace(prompt_ids=p, token_ids=c, logprobs=s)
               for p, c, s in zip(rows_prompts, completions, sampler)]
    before = _completion_logprobs(ddp, rows_prompts, completions, cfg.vocab_size)
    restore = _mutate(mutation)
    try:
        out = rl_step(SimpleNamespace(samples=samples, index=0), torch.tensor(rewards), ac, ddp, opt, ref,
                      cfg.vocab_size)
    finally:
        restore()
    head_grad = model.output_layer.weight.main_grad[:cfg.vocab_size].clone()  # the step's gradient (kept after it)
    after = _completion_logprobs(ddp, rows_prompts, completions, cfg.vocab_size)
    return {"out": out, "head_grad": head_grad, "before": before, "after": after}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def solo():
    """One learner process (world 1: TP1 PP1 DP1)."""
    from megatron_async_rlhf.launch import WorkerGroup

    group = WorkerGroup(1, timeout_s=300)
    yield group
    group.close(force=not group.alive)


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """The batch, the reference model's directory and the plain-transformers log-probs (policy with grad)."""
    from transformers import LlamaForCausalLM

    policy_dir = tiny_models["tiny-gqa"]
    policy = LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, attn_implementation="eager")
    ref_model = LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a reference that differs from the policy: the KL and DPO reference terms are not 0
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ref_dir = str(tmp_path_factory.mktemp("rl_wiring_ref"))
    ref_model.save_pretrained(ref_dir)
    prompts, completions, rewards, best_rows = _make_batch(policy.config.vocab_size)
    rows_prompts = [prompts[i // K] for i in range(len(completions))]
    with torch.no_grad():
        ref_lp = [_hf_completion_logprobs(ref_model, p, c) for p, c in zip(rows_prompts, completions)]
        plain = [_hf_completion_logprobs(policy, p, c) for p, c in zip(rows_prompts, completions)]
    # the sampler (an older policy / another engine): the policy's log-probs +- 0.4 nats a token
    sampler = [lp + 0.8 * torch.rand(lp.shape, generator=g) - 0.4 for lp in plain]
    return SimpleNamespace(policy=policy, policy_dir=policy_dir, ref_dir=ref_dir, prompts=prompts,
                           rows_prompts=rows_prompts, completions=completions, rewards=rewards, best_rows=best_rows,
                           ref_lp=ref_lp, plain=plain, sampler=sampler)


_RUNS: dict = {}


def _run(solo, reference, name: str, mutation: str = "none", updates: int = 1, settings: dict | None = None) -> dict:
    key = (name, mutation, updates, repr(settings))
    if key not in _RUNS:
        _RUNS[key] = solo.run(_rl_job, reference.policy_dir, reference.ref_dir, name, reference.prompts,
                              reference.completions, [s.tolist() for s in reference.sampler], reference.rewards,
                              mutation, updates, settings)[0]
    return _RUNS[key]


_EXPECTED: dict = {}


def _expected(reference, name: str) -> dict:
    """The hand-written loss on plain-transformers log-probs, its gradient norm and the lm_head gradient."""
    if name not in _EXPECTED:
        policy = reference.policy
        policy.zero_grad()
        logp = [_hf_completion_logprobs(policy, p, c) for p, c in zip(reference.rows_prompts, reference.completions)]
        loss = LOSSES[name](logp, reference.ref_lp, reference.sampler, reference.rewards, **SETTINGS[name])
        loss.backward()
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        _EXPECTED[name] = {"loss": float(loss.detach()), "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum()
                                                                                  for g in grads))),
                           "head_grad": policy.lm_head.weight.grad.clone()}
        policy.zero_grad()
    return _EXPECTED[name]


def _mismatches(reference, name: str, res: dict) -> list[str]:
    """Where the step differs from the hand-written computation (empty: it agrees)."""
    exp = _expected(reference, name)
    out, bad = res["out"], []
    if "loss" not in out or abs(out["loss"] - exp["loss"]) > 1e-5 + 1e-4 * abs(exp["loss"]):
        bad.append(f"loss {out.get('loss')} != hand-written {exp['loss']}")
    if abs(out["grad_norm"] - exp["grad_norm"]) > 1e-3 * exp["grad_norm"]:
        bad.append(f"grad norm {out['grad_norm']} != hand-written {exp['grad_norm']}")
    scale = exp["head_grad"].abs().max()
    diff = (res["head_grad"] - exp["head_grad"]).abs().max() / scale
    if diff > 1e-3:
        bad.append(f"lm_head gradient differs by {float(diff):.2e} of its largest entry")
    # one Adam step later: the fixed best completion is more likely (its implicit reward beta * log pi / pi_ref
    # rises, pi_ref being fixed) and the loss at the new log-probs is lower
    for i in reference.best_rows:
        gain = float(res["after"][i].sum() - res["before"][i].sum())
        if not gain > 0:
            bad.append(f"the best completion's log-prob at row {i} moved by {gain:.3g} after the step, not up")
    kw = dict(SETTINGS[name])
    if name == "ppo":
        kw["old"] = res["before"]  # the ratio against the policy the batch was trained from
    with torch.no_grad():
        before = float(LOSSES[name](res["before"], reference.ref_lp, reference.sampler, reference.rewards, **kw))
        after = float(LOSSES[name](res["after"], reference.ref_lp, reference.sampler, reference.rewards, **kw))
    if not after < before:
        bad.append(f"the hand-written loss went from {before:.6g} to {after:.6g} over the step, not down")
    return bad


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["online_dpo", "rloo", "ppo"])
def test_rl_step_is_the_hand_written_loss_and_improves_the_best_completion(solo, reference, name):
    res = _run(solo, reference, name)
    # the learner's forward is transformers' (before any update): the rest compares like with like
    for i, (a, b) in enumerate(zip(res["before"], reference.plain)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, i=i: f"row {i}: {m}")
    if name == "online_dpo":
        assert res["out"]["pairs"] == 3  # prompt 3 ties: no pair
    if name == "ppo":  # the batch exercises the cap: some importance weights are truncated, most are not
        w = torch.cat([torch.exp(a - s) for a, s in zip(reference.plain, reference.sampler)])
        assert 0 < int((w > SETTINGS["ppo"]["tis_cap"]).sum()) < len(w) / 2
    bad = _mismatches(reference, name, res)
    exp = _expected(reference, name)
    gains = [round(float(res["after"][i].sum() - res["before"][i].sum()), 4) for i in reference.best_rows]
    print(f"{name}: best completion log-prob gains {gains}")
    print(f"{name}: loss {res['out']['loss']:.6f} (hand-written {exp['loss']:.6f}), grad norm "
          f"{res['out']['grad_norm']:.5f} (hand-written {exp['grad_norm']:.5f})")
    assert not bad, f"rl_step({name}) disagrees with the hand-written computation from transformers: " + "; ".join(bad)


@pytest.mark.parametrize("name,mutation", [
    ("online_dpo", "swap_chosen_rejected"), ("online_dpo", "negate_dpo_reference"),
    ("rloo", "negate_kl"), ("rloo", "shift_advantages"),
    ("ppo", "shift_advantages"), ("ppo", "drop_importance_weight"),
])
def test_a_broken_wiring_is_caught(solo, reference, name, mutation):
    """The comparison above reports each of these breakages (the code is patched in the worker for one step)."""
    bad = _mismatches(reference, name, _run(solo, reference, name, mutation))
    print(f"{name} / {mutation}: {bad}")
    assert any(b.startswith("loss") for b in bad), f"{mutation} in {name} went unnoticed by the loss check: {bad}"


def test_ppo_second_update_is_clipped_against_the_policy_before_the_first(solo, reference):
    """``updates_per_batch=2``: the second update's loss is PPO-clip with the ratio against the log-probs the batch
    arrived with (``old``) and the policy after the first update, the same one a one-update step ends at."""
    clip = {"clip_eps": 0.03, "tis_cap": SETTINGS["ppo"]["tis_cap"]}  # small enough for the first update to cross it
    one, two = _run(solo, reference, "ppo", settings=clip), _run(solo, reference, "ppo", updates=2, settings=clip)
    after_one = one["after"]  # the policy after the first update (the learner's forward, checked against HF above)
    ratio = torch.cat([torch.exp(a - b) for a, b in zip(after_one, one["before"])])
    clipped = float(((ratio - 1).abs() > clip["clip_eps"]).float().mean())
    assert 0.1 < clipped < 0.9, f"the test's step should clip some tokens, not {clipped:.0%}"
    args = (after_one, reference.ref_lp, reference.sampler, reference.rewards)
    with torch.no_grad():
        expected = float(_ppo_loss(*args, old=one["before"], **clip))
        ratio_one = float(_ppo_loss(*args, **clip))  # the ratio against the current policy: clip never acts
        unclipped = float(_ppo_loss(*args, old=one["before"], clip_eps=1e9, tis_cap=clip["tis_cap"]))
    loss = two["out"]["loss"]
    print(f"ppo, 2 updates: loss {loss:.6f} (hand-written {expected:.6f}; ratio 1: {ratio_one:.6f}, "
          f"unclipped: {unclipped:.6f}), clip fraction {two['out']['clip_fraction']:.3f} (hand-written {clipped:.3f})")
    tol = 1e-5 + 1e-4 * abs(expected)
    # the check can tell the right loss from the ratio-1 and the unclipped ones
    assert abs(ratio_one - expected) > 10 * tol and abs(unclipped - expected) > 10 * tol
    assert abs(loss - expected) < tol, f"PPO's second update: loss {loss} != hand-written {expected}"
    assert two["out"]["clip_fraction"] == pytest.approx(clipped, abs=1.01 / len(ratio))  # a token on the edge may flip
    assert two["out"]["optimizer_steps"] == 2
