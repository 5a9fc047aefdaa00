"""Reward models (mode=rm): the Bradley-Terry loss, the last-token value read, the scalar-head learner against
transformers' LlamaForSequenceClassification (values at TP1/TP2/PP2, one training step's loss and grad norm), the
export through vLLM's pooling runner, the converter both ways, bad preference data, judges, and a short mode=rm run.

Tolerance for learner vs transformers vs vLLM values: fp32, 1e-5 absolute (values of magnitude ~1; seen <= 1e-6)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_async_rlhf.algorithms.bradley_terry import bradley_terry_loss
from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.learner.value_head import last_token_index, last_token_values, right_padded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_against_hand_numbers():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])  # differences 1, -1, 0
    # -log sigmoid(x) = log(1 + e^-x): x=1 -> 0.3132617, x=-1 -> 1.3132617, x=0 -> 0.6931472
    loss, m = bradley_terry_loss(chosen, rejected)
    assert abs(loss.item() - (0.3132617 + 1.3132617 + 0.6931472) / 3) < 1e-6
    assert abs(m["accuracy"].item() - 1 / 3) < 1e-7  # a tie is not a win
    # margin 0.5 everywhere: x = 0.5, -1.5, -0.5 -> 0.4740770, 1.7014132, 0.9740770
    loss, _ = bradley_terry_loss(chosen, rejected, 0.5)
    assert abs(loss.item() - (0.4740770 + 1.7014132 + 0.9740770) / 3) < 1e-6
    # per-pair margins [1, 0, 0]: x = 0, -1, 0
    loss, _ = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 0.0, 0.0]))
    assert abs(loss.item() - (0.6931472 + 1.3132617 + 0.6931472) / 3) < 1e-6
    # gradient: d loss / d r_chosen_i = -sigmoid(-x_i) / B, and the opposite for r_rejected
    c = chosen.clone().requires_grad_()
    bradley_terry_loss(c, rejected)[0].backward()
    want = [-1 / (1 + math.exp(x)) / 3 for x in (1.0, -1.0, 0.0)]
    assert torch.allclose(c.grad, torch.tensor(want), atol=1e-7)
    with pytest.raises(ValueError, match="must both be"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))


def test_learning_rate_warmup_then_linear_decay():
    """``rm.warmup_steps``: the first steps rise to the peak, the decay to 0 spans the steps after them (hand
    numbers: peak 1.0, 10 steps, 4 warm-up)."""
    from types import SimpleNamespace

    from megatron_async_rlhf.learner.train import set_lr

    opt = SimpleNamespace(param_groups=[{}, {}])
    lrs = [set_lr(opt, 1.0, "linear", done, 10, warmup=4) for done in range(10)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert opt.param_groups == [{"lr": lrs[-1]}, {"lr": lrs[-1]}]
    assert [set_lr(opt, 2.0, "constant", d, 10, warmup=2) for d in (0, 1, 5)] == [1.0, 2.0, 2.0]
    assert [set_lr(opt, 1.0, "linear", d, 4) for d in range(4)] == [1.0, 0.75, 0.5, 0.25]  # no warm-up: as before


def test_last_token_read_with_right_and_left_padding():
    values = torch.arange(18.0).view(3, 6)  # [b, s]: row i position j holds 6i + j
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [3, 1, 5]
    assert last_token_values(values, right).tolist() == [values[0, 3], values[1, 1], values[2, 5]]
    assert last_token_values(values, left).tolist() == [values[0, 5], values[1, 5], values[2, 5]]
    assert last_token_values(values, right.bool()).tolist() == [3.0, 7.0, 17.0]
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    tokens, mask = right_padded([[5, 6, 7], [8]], rows=3, pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert last_token_index(mask).tolist() == [2, 0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# learner vs transformers vs vLLM
# ---------------------------------------------------------------------------------------------------------------------


def _seqs(vocab: int, n: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lengths]  # no pad (0) / special ids


def _hf_values(rm_dir: str, seqs: list[list[int]]) -> torch.Tensor:
    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

    return RewardModelScorer(rm_dir, batch_size=4).score_ids(seqs)


def _reported(per_rank):
    out = [r for r in per_rank if r is not None]
    assert len(out) == 1, f"{len(out)} ranks reported"
    return out[0]


@pytest.fixture(scope="module")
def exported(pool, tiny_models, tmp_path_factory):
    """preset -> (RM directory made by the learner from the LM's trunk + a fresh head, the learner's TP1 values)."""
    from megatron_async_rlhf.checks import jobs

    out = {}
    for preset in ("tiny-gqa", "tiny-tied"):
        d = str(tmp_path_factory.mktemp("rm") / preset)
        vocab = json.load(open(os.path.join(tiny_models[preset], "config.json")))["vocab_size"]
        seqs = _seqs(vocab)
        values = _reported(pool.run(jobs.values_from_hf, tiny_models[preset], 1, 1, seqs, d))
        out[preset] = (d, seqs, values)
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("preset,tp,pp", [("tiny-gqa", 1, 1), ("tiny-gqa", 2, 1), ("tiny-tied", 1, 2),
                                          ("tiny-tied", 2, 2)])
def test_exported_reward_model_scores_equal_the_learner(pool, exported, preset, tp, pp):
    from transformers import AutoConfig, AutoTokenizer

    from megatron_async_rlhf.checks import jobs

    rm_dir, seqs, learner_tp1 = exported[preset]
    cfg = AutoConfig.from_pretrained(rm_dir)
    assert cfg.architectures == ["LlamaForSequenceClassification"] and cfg.num_labels == 1
    assert cfg.pad_token_id == AutoTokenizer.from_pretrained(rm_dir).pad_token_id  # tokenizer travelled along
    hf = _hf_values(rm_dir, seqs)
    assert hf.std() > 1e-3  # the head is not degenerate: sequences get different scores
    torch.testing.assert_close(learner_tp1, hf, atol=ATOL, rtol=0)
    # the exported classifier loaded back into the learner at another layout (its score head, not a fresh one)
    again = _reported(pool.run(jobs.values_from_hf, rm_dir, tp, pp, seqs))
    torch.testing.assert_close(again, hf, atol=ATOL, rtol=0)


def _step_job(hf_dir, tp, pp, groups, micro_batch):
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training
    from megatron_async_rlhf.learner.build import value_model_from_hf
    from megatron_async_rlhf.modes.rm import bradley_terry_step

    _, model, _ = value_model_from_hf(hf_dir, tp, pp, dtype=torch.float32)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-3, clip_grad=1e9))  # a clip that never bites: the norm
    return bradley_terry_step(ddp, opt, groups, micro_batch)


def _split_step_job(hf_dir, tp, pp, groups, micro_batch):
    """As mode=rm splits a batch: data-parallel replica r trains on groups[r::dp], weighted by all replicas' pairs."""
    from megatron_async_rlhf.learner.parallel import ranks
    from megatron_async_rlhf.learner.train import OptimConfig, wrap_for_training
    from megatron_async_rlhf.learner.build import value_model_from_hf
    from megatron_async_rlhf.modes.rm import bradley_terry_step

    _, model, _ = value_model_from_hf(hf_dir, tp, pp, dtype=torch.float32)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-3, clip_grad=1e9))
    r = ranks()
    return bradley_terry_step(ddp, opt, groups[r["dp_rank"]::r["dp"]], micro_batch, sum(map(len, groups)))


def _head_lr_job(hf_dir, groups, micro_batch, mult):
    """One step with ``rm.head_lr_mult=mult``: Adam's first update is ``lr * g / (|g| + eps)``, about ``lr`` per
    coordinate whatever the gradient, so the head's largest move over the trunk's is the multiplier."""
    from megatron_async_rlhf.learner.train import OptimConfig, set_lr, wrap_for_training
    from megatron_async_rlhf.learner.build import value_model_from_hf
    from megatron_async_rlhf.modes.rm import bradley_terry_step

    _, model, _ = value_model_from_hf(hf_dir, 1, 1, dtype=torch.float32)
    head, norm = model.output_layer.weight, model.decoder.final_layernorm.weight
    before = head.detach().clone(), norm.detach().clone()
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-3, clip_grad=1e9, head_lr_mult=mult))
    set_lr(opt, 1e-3)
    bradley_terry_step(ddp, opt, groups, micro_batch)
    return {"head": float((head - before[0]).abs().max()) / 1e-3, "trunk": float((norm - before[1]).abs().max()) / 1e-3,
            "group_lrs": sorted(g["lr"] for g in opt.param_groups)}


@pytest.mark.multiproc
def test_head_learning_rate_multiplier(pool, exported):
    """``rm.head_lr_mult``: the head's parameter group steps at ``mult * lr`` and the trunk's at ``lr``."""
    from megatron_async_rlhf.data.preferences import TokenizedPair

    rm_dir, seqs, _ = exported["tiny-gqa"]
    pairs = [[TokenizedPair(seqs[2 * i], seqs[2 * i + 1], 0.0)] for i in range(3)]
    for mult in (1.0, 20.0):
        out = pool.run(_head_lr_job, rm_dir, pairs, 8, mult)[0]
        assert out["head"] == pytest.approx(mult, rel=1e-3) and out["trunk"] == pytest.approx(1.0, rel=1e-3), out
        assert out["group_lrs"][-1] == pytest.approx(1e-3 * mult)


def _transformers_step(rm_dir, pairs):
    """Bradley-Terry loss, accuracy and grad norm of ``pairs`` through transformers' classifier (every sequence of
    every pair forwarded on its own row: the independent reference of the learner's de-duplicated step)."""
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    tokens, mask = right_padded([s for p in pairs for s in (p.chosen, p.rejected)], 2 * len(pairs))
    v = model(input_ids=tokens, attention_mask=mask.long()).logits[:, 0]
    loss, m = bradley_terry_loss(v[0::2], v[1::2], torch.tensor([p.margin for p in pairs]))
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), m["accuracy"].item(), grad_norm.item()


def _more_seqs(rm_dir, lengths, seed=1):
    vocab = json.load(open(os.path.join(rm_dir, "config.json")))["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.multiproc
def test_one_training_step_matches_transformers_loss_and_gradient(pool, exported):
    """Loss and gradient norm of one Bradley-Terry step at TP1, TP2 and PP2 (5 pairs in micro-batches of 2 pairs,
    the last one a single pair, shapes differing) against transformers' classifier with the same weights (an
    independent backward)."""
    from megatron_async_rlhf.data.preferences import TokenizedPair

    rm_dir, seqs, _ = exported["tiny-gqa"]
    pool_of = seqs + _more_seqs(rm_dir, (4, 7, 9, 5))  # 10 sequences: 5 pairs
    pairs = [TokenizedPair(pool_of[2 * i], pool_of[2 * i + 1], 0.25 * i) for i in range(5)]
    loss, acc, grad_norm = _transformers_step(rm_dir, pairs)
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        out = pool.run(_step_job, rm_dir, tp, pp, [[p] for p in pairs], 4)[0]  # the same on every rank
        assert abs(out["loss"] - loss) < ATOL, (tp, pp, out, loss)
        assert abs(out["accuracy"] - acc) < 1e-6
        assert abs(out["grad_norm"] - grad_norm) < 1e-4 * grad_norm, (tp, pp, out, grad_norm)
        dp = 4 // (tp * pp)  # the pool's 4 ranks: each data-parallel replica trains on the same pairs here
        assert out["pairs"] == 5 * dp and out["sequences"] == 10 * dp


def test_comparison_groups_and_their_micro_batches():
    """Pairs sharing a sequence form one group (connected through any shared response); a group's micro-batch holds
    each sequence once, and its pair indices point back at the right rows."""
    from megatron_async_rlhf.data.preferences import TokenizedPair, comparison_groups
    from megatron_async_rlhf.modes.rm import group_micro_batches

    a, b, c, d, e, f, g = ([i] * (i + 1) for i in range(1, 8))  # sequences of different lengths
    pairs = [TokenizedPair(a, b, 0.0), TokenizedPair(e, f, 0.0), TokenizedPair(c, b, 0.1), TokenizedPair(a, c, 0.2),
             TokenizedPair(d, c, 0.3), TokenizedPair(g, f, 0.4)]
    assert comparison_groups(pairs) == [[0, 2, 3, 4], [1, 5]]  # {a, b, c, d} and {e, f, g}
    assert comparison_groups([TokenizedPair(a, b, 0.0), TokenizedPair(b, a, 0.0)]) == [[0, 1]]
    groups = [[pairs[i] for i in grp] for grp in comparison_groups(pairs)]
    for micro, sizes in ((16, [7]), (5, [4, 3]), (3, [4, 3])):  # a group larger than the cap goes alone
        mbs = group_micro_batches(groups, micro)
        assert [len(m["tokens"]) for m in mbs] == sizes
        got = []
        for m in mbs:
            rows = [m["tokens"][i][m["mask"][i]].tolist() for i in range(len(m["tokens"]))]
            assert len({tuple(r) for r in rows}) == len(rows)  # no sequence twice
            assert m["tokens"].shape[1] == max(map(len, rows))  # padded to its own longest row
            got += [(rows[i], rows[j], mg) for i, j, mg in zip(m["chosen"].tolist(), m["rejected"].tolist(),
                                                                 m["margin"].tolist())]
        assert got == [(p.chosen, p.rejected, pytest.approx(p.margin)) for grp in groups for p in grp]


@pytest.mark.multiproc
def test_grouped_step_forwards_each_response_once_and_matches_transformers(pool, exported):
    """All 6 comparisons of 4 responses, 3 of 3 more and one plain pair (10 pairs, 9 distinct sequences): the learner
    forwards 9 rows (3 micro-batches of different shapes, through a pipeline at PP2) and its loss, accuracy and grad
    norm equal transformers' on the 10 pairs forwarded as 20 rows."""
    import itertools

    from megatron_async_rlhf.data.preferences import TokenizedPair, comparison_groups

    rm_dir, seqs, _ = exported["tiny-gqa"]
    s = seqs + _more_seqs(rm_dir, (8, 11, 4), seed=2)  # 9 sequences
    pairs = [TokenizedPair(s[i], s[j], 0.1 * i) for i, j in itertools.combinations(range(4), 2)]
    pairs += [TokenizedPair(s[j], s[i], 0.0) for i, j in itertools.combinations(range(4, 7), 2)]
    pairs += [TokenizedPair(s[7], s[8], 0.5)]
    loss, acc, grad_norm = _transformers_step(rm_dir, pairs)
    groups = [[pairs[i] for i in g] for g in comparison_groups(pairs)]
    assert [len(g) for g in groups] == [6, 3, 1]
    for tp, pp in ((1, 1), (1, 2)):
        out = pool.run(_step_job, rm_dir, tp, pp, groups, 4)[0]
        dp = 4 // (tp * pp)
        assert out["pairs"] == 10 * dp and out["sequences"] == 9 * dp
        assert abs(out["loss"] - loss) < ATOL, (tp, pp, out, loss)
        assert abs(out["accuracy"] - acc) < 1e-6
        assert abs(out["grad_norm"] - grad_norm) < 1e-4 * grad_norm, (tp, pp, out, grad_norm)
    # split over 2 replicas as mode=rm does: 7 pairs on one, 3 on the other; still the mean over all 10 pairs
    out = pool.run(_split_step_job, rm_dir, 2, 1, groups, 4)[0]
    assert out["pairs"] == 10 and out["sequences"] == 9
    assert abs(out["loss"] - loss) < ATOL and abs(out["accuracy"] - acc) < 1e-6, (out, loss)
    assert abs(out["grad_norm"] - grad_norm) < 1e-4 * grad_norm, (out, grad_norm)


@pytest.mark.multiproc
def test_vllm_pooling_scores_equal_transformers(exported):
    """vLLM's pooling runner on the exported RM: raw logits (``use_activation=False``) equal transformers', and the
    default ``classify`` output is their sigmoid."""
    rm_dir, seqs, learner = exported["tiny-gqa"]
    script = (
        "import json, sys\n"
        "from megatron_async_rlhf.rewards.reward_model import VLLMRewardModel\n"
        "seqs = json.loads(sys.argv[2])\n"
        "rm = VLLMRewardModel(sys.argv[1], max_model_len=64)\n"
        "probs = [o.outputs.probs[0] for o in rm.llm.classify([{'prompt_token_ids': s} for s in seqs], use_tqdm=False)]\n"
        "import psutil\n"
        "print('RESULT', json.dumps({'logits': rm.score_ids(seqs).tolist(), 'probs': probs,\n"
        "                            'children': len(psutil.Process().children(recursive=True))}))\n"
    )
    # a multi-process switch left in the environment (by an engine built earlier, as a suite's tests do) is not
    # inherited: on CPU the pooling engine runs in-process, as the rollout engines do
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    r = subprocess.run([sys.executable, "-c", script, rm_dir, json.dumps(seqs)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])  # vLLM may log after it (its shutdown)
    hf = _hf_values(rm_dir, seqs)
    torch.testing.assert_close(torch.tensor(got["logits"]), hf, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(got["probs"]), torch.sigmoid(hf), atol=ATOL, rtol=0)
    torch.testing.assert_close(learner, hf, atol=ATOL, rtol=0)
    assert got["children"] == 0  # in-process: no engine core process


@pytest.mark.multiproc
def test_converter_round_trip_of_a_reward_model(pool, exported, tmp_path):
    """The converter's jobs (tools/convert_checkpoint.py): HF classifier -> Megatron saved at TP2 -> HF classifier
    exported at PP2, bit-exact; the CLI refuses a classifier's checkpoint with a language model's config."""
    from safetensors.torch import load_file

    from megatron_async_rlhf.checks import jobs

    rm_dir = exported["tiny-tied"][0]
    pool.run(jobs.hf_to_mcore, rm_dir, str(tmp_path / "mc"), 2, 1)
    pool.run(jobs.mcore_to_hf, str(tmp_path / "mc"), rm_dir, str(tmp_path / "back"), 1, 2)
    a, b = load_file(f"{rm_dir}/model.safetensors"), load_file(f"{tmp_path}/back/model.safetensors")
    assert sorted(a) == sorted(b) and "score.weight" in a and "lm_head.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    lm_config = tmp_path / "lm"
    lm_config.mkdir()
    cfg = json.load(open(f"{rm_dir}/config.json"))
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(lm_config / "config.json", "w"))
    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    r = subprocess.run([sys.executable, tool, "mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--hf-config",
                        str(lm_config), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is a lm model, but checkpoint" in r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------------


def _pair(ex, **keys):
    from megatron_async_rlhf.data.preferences import pair_from_row

    kw = dict(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected")
    kw.update(keys)
    return pair_from_row(ex, "prefs.jsonl split 'train' row 7", **kw)


def test_preference_rows_strings_and_conversations():
    p = _pair({"prompt": "Hi", "chosen": " yes", "rejected": " no"})
    assert (p.prompt, p.chosen, p.rejected, p.margin) == ("Hi", " yes", " no", None)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}]
    p = _pair({"prompt": "Hi", "chosen": conv + [{"role": "assistant", "content": "good"}],
               "rejected": conv + [{"role": "assistant", "content": "bad"}]})
    assert p.prompt == conv and (p.chosen, p.rejected) == ("good", "bad")  # the prompt is the turns before
    p = _pair({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "x"}],
               "rejected": [{"role": "assistant", "content": "y"}], "m": 2}, margin_key="m")
    assert p.prompt == [{"role": "user", "content": "Hi"}] and p.margin == 2.0


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Hi", "rejected": "b"}, "row 7: key 'chosen' is missing or empty"),
    ({"prompt": "Hi", "chosen": "", "rejected": "b"}, "row 7: key 'chosen' is missing or empty"),
    ({"prompt": "Hi", "chosen": "a", "rejected": None}, "row 7: key 'rejected' is missing or empty"),
    ({"chosen": "a", "rejected": "b"}, "row 7: key 'prompt' (the prompt) is missing or empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "row 7: key 'prompt' (the prompt) is missing or empty"),
    ({"prompt": "Hi", "chosen": "same", "rejected": "same"}, "row 7: 'chosen' and 'rejected' are identical"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant",
                                                                                   "content": "b"}]},
     "must end with the assistant's response"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "different turns before their last assistant turn"),
    ({"prompt": "Hi", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be strings or both"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "b"}, "key 'chosen' is neither a string nor"),
])
def test_bad_preference_rows_are_named(row, message):
    with pytest.raises(ConfigError, match="prefs.jsonl split 'train' row 7") as e:
        _pair(row)
    assert message in str(e.value)


def test_too_long_pairs_and_out_of_vocab_are_errors(tiny_models):
    from transformers import AutoTokenizer

    from megatron_async_rlhf.data.preferences import PreferencePair, tokenize_pairs

    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-gqa"])
    pairs = [PreferencePair("Q: 1+1= A:", " 2", " 3"), PreferencePair("Q: 1+1= A:", " 2" * 40, " 3")]
    out = tokenize_pairs(tok, pairs[:1], 16, default_margin=0.5)
    assert out[0].chosen[0] == tok.bos_token_id and out[0].margin == 0.5 and out[0].chosen != out[0].rejected
    with pytest.raises(ConfigError, match=r"pair 1: prompt \+ chosen response is \d+ tokens > 16"):
        tokenize_pairs(tok, pairs, 16)
    with pytest.raises(ConfigError, match="outside the model's vocab"):
        tokenize_pairs(tok, pairs[:1], 16, vocab_size=5)
    with pytest.raises(ConfigError, match="ends with the pad token"):
        tokenize_pairs(tok, [PreferencePair("Q:", " 2", " 3<pad>")], 16, pad_token_id=tok.pad_token_id)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize("bad,message", [
    ({"prompt": "Q: 1+1= A:", "chosen": " 2", "rejected": " 2"}, "split 'train' row 3: 'chosen' and 'rejected' are "
                                                                   "identical"),
    ({"prompt": "Q: 1+1= A:", "chosen": "", "rejected": " 2"}, "split 'train' row 3: key 'chosen' is missing or empty"),
    ({"prompt": "Q: 1+1= A:", "chosen": " 2" * 100, "rejected": " 3"}, "pair 3: prompt + chosen response is"),
])
def test_bad_preference_data_fails_before_any_process(tmp_path, capsys, bad, message):
    from megatron_async_rlhf.data.preferences import marker_preferences
    from megatron_async_rlhf.train import main

    rows = marker_preferences(8)
    rows[3] = bad
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", marker_preferences(4, seed=1))
    assert main(["mode=rm", f"data.source={tmp_path}", f"logging.out_dir={tmp_path}/out", "rm.batch_size=4",
                 "rm.max_len=64"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_mode_rm_needs_preference_data_and_a_context_that_exists(tmp_path, capsys):
    from megatron_async_rlhf.data.preferences import marker_preferences
    from megatron_async_rlhf.train import main

    assert main(["mode=rm", f"logging.out_dir={tmp_path}/out"]) == 2  # the default source holds prompts, not pairs
    assert "mode=rm trains on preference pairs, but data.source='arithmetic'" in capsys.readouterr().err
    _write_jsonl(tmp_path / "train.jsonl", marker_preferences(8))
    _write_jsonl(tmp_path / "test.jsonl", marker_preferences(4, seed=1))
    assert main(["mode=rm", f"data.source={tmp_path}", f"logging.out_dir={tmp_path}/out", "rm.max_len=100000"]) == 2
    assert "rm.max_len=100000 exceeds the model's max_position_embeddings=256" in capsys.readouterr().err


def test_classifier_with_several_labels_is_rejected(tmp_path, tiny_models, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from megatron_async_rlhf.weights.llama_config import check_hf_model
    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-gqa"])
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), num_labels=3, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "c3")
    tok.save_pretrained(tmp_path / "c3")
    with pytest.raises(ValueError, match="num_labels=3; a reward model has one output"):
        RewardModelScorer(str(tmp_path / "c3"))
    with pytest.raises(ConfigError, match="num_labels=3; a reward model has one output"):  # the converter's check
        check_hf_model(str(tmp_path / "c3"))


# ---------------------------------------------------------------------------------------------------------------------
# judges
# ---------------------------------------------------------------------------------------------------------------------


def test_vader_judge_reward_and_labeller():
    from megatron_async_rlhf.config import RewardConfig, run_config_from_dict
    from megatron_async_rlhf.rewards.judges import JUDGES, label_pairs, register
    from megatron_async_rlhf.rewards.scorer import build_scorer

    scorer = build_scorer(RewardConfig(kind="judge", judge="vader"))
    s = scorer.score(["", "", ""], ["What a wonderful, kind day!", "A dull, rainy and awful day.", "7 + 5 = 12"])
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0  # compound in [-1, 1]; neutral text scores 0
    rows, ties = label_pairs("vader", ["a", [{"role": "user", "content": "b"}], "c"],
                             ["This is awful.", "I love it!", "7"], ["This is great!", "I hate it.", "8"])
    assert ties == 1 and [(r["chosen"], r["rejected"]) for r in rows] == [("This is great!", "This is awful."),
                                                                          ("I love it!", "I hate it.")]
    assert rows[1]["prompt"] == [{"role": "user", "content": "b"}] and rows[0]["chosen_score"] > rows[0]["rejected_score"]

    register("length_test")(lambda prompts, completions: [float(len(c)) for c in completions])
    try:
        assert label_pairs("length_test", ["p"], ["ab"], ["abc"])[0][0]["chosen"] == "abc"
    finally:
        JUDGES.pop("length_test")
    with pytest.raises(ConfigError, match="reward.judge='nope' unknown"):
        run_config_from_dict({"reward": {"kind": "judge", "judge": "nope"}}).validate()


# ---------------------------------------------------------------------------------------------------------------------
# mode=rm end to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.multiproc
def test_mode_rm_learns_a_preference_and_exports(tmp_path):
    """``python -m megatron_async_rlhf mode=rm`` on 2 learner ranks (DP2) and a toy preference set that needs the
    prompt (the asked-for marker word): held-out accuracy from about chance to > 0.9, last line ``rm_accuracy=``, the
    export scores in transformers like the learner's final evaluation ranks the pairs."""
    from megatron_async_rlhf.data.preferences import marker_preferences

    _write_jsonl(tmp_path / "train.jsonl", marker_preferences(256, seed=0))
    _write_jsonl(tmp_path / "test.jsonl", marker_preferences(64, seed=1))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megatron_async_rlhf", "mode=rm", f"data.source={tmp_path}",
                        f"logging.out_dir={out}", "logging.wandb_mode=disabled", "pin_cpus=false",
                        "cluster.learner_dp=2", "rm.steps=30", "rm.eval_every=15", "rm.lr=2e-3",
                        "rm.lr_schedule=linear", "rm.batch_size=16", "rm.micro_batch=8", "data.eval_size=64"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("rm_accuracy=")
    fields = dict(kv.split("=", 1) for kv in last.split())
    assert float(fields["rm_accuracy"]) > 0.9 and float(fields["rm_accuracy_before"]) < 0.75
    evals = [json.loads(x) for x in open(out / "metrics.jsonl") if '"rm_eval"' in x]
    assert [e["step"] for e in evals] == [0, 15, 30] and all(e["n"] == 64 for e in evals)
    lrs = [json.loads(x)["lr"] for x in open(out / "metrics.jsonl") if '"phase": "rm"' in x]
    assert len(lrs) == 30 and lrs[0] == pytest.approx(2e-3, abs=1e-6)  # linear decay to 0 (metrics keep 7 significant digits)
    assert lrs[-1] == pytest.approx(2e-3 / 30, abs=1e-6)
    assert "[rank 1]" in r.stderr and "[rank 2]" not in r.stderr  # the 2 learner ranks only: no rollout engine

    from megatron_async_rlhf.rewards.reward_model import RewardModelScorer

    # the export scores text the way it was trained (its config.json records the input format), in transformers
    rm = RewardModelScorer(str(out / "reward_model" / "final"))
    assert rm.input_format == {"use_chat_template": False, "template": ""}
    test = marker_preferences(64, seed=1)
    chosen = rm.score([x["prompt"] for x in test], [x["chosen"] for x in test])
    rejected = rm.score([x["prompt"] for x in test], [x["rejected"] for x in test])
    hf_acc = (chosen > rejected).float().mean().item()
    assert abs(hf_acc - float(fields["rm_accuracy"])) < 1e-9  # the export ranks the held-out pairs as the learner did
