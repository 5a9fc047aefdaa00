"""Converter: HF -> mcore -> HF bit-exact, TP2-saved checkpoints loading at TP1/PP2 and TP2xPP2, bad inputs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_async_rlhf.checks import jobs
from megatron_async_rlhf.checks.parity import compare, hf_reference, random_batches, reported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


@pytest.fixture(scope="module")
def tp2_checkpoints(pool, tiny_models, tmp_path_factory):
    """preset -> Megatron dist checkpoint saved at TP2 (x DP2)."""
    root = tmp_path_factory.mktemp("mcore")
    out = {}
    for preset in ("tiny-gqa", "tiny-tied"):
        out[preset] = str(root / preset)
        pool.run(jobs.hf_to_mcore, tiny_models[preset], out[preset], 2, 1)
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("preset", ["tiny-gqa", "tiny-tied"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(pool, tiny_models, tp2_checkpoints, tmp_path, preset):
    hf_dir = tiny_models[preset]
    back = str(tmp_path / "hf")
    pool.run(jobs.mcore_to_hf, tp2_checkpoints[preset], hf_dir, back, 1, 2)  # saved at TP2, exported at PP2
    a, b = load_file(f"{hf_dir}/model.safetensors"), load_file(f"{back}/model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(back)
    assert model.config.tie_word_embeddings == (preset == "tiny-tied")
    assert AutoTokenizer.from_pretrained(back).decode(AutoTokenizer.from_pretrained(back)("Q: 3+4=")["input_ids"]) \
        == "Q: 3+4="
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # atomic write left no temporary directory


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2), (1, 1)])
def test_tp2_checkpoint_loads_at_other_layouts(pool, tiny_models, tp2_checkpoints, tp, pp):
    for preset, ckpt in tp2_checkpoints.items():
        hf_dir = tiny_models[preset]
        batches = random_batches(json.load(open(f"{hf_dir}/config.json"))["vocab_size"], 2, 16, 2, seed=3)
        res = compare(reported(pool.run(jobs.parity_from_mcore, ckpt, hf_dir, tp, pp, batches)),
                      hf_reference(hf_dir, batches))
        assert res.ok, f"{preset} saved TP2, loaded tp={tp} pp={pp}: {res.line()}"


def _cli(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        t = load_file(f"{dst}/model.safetensors")
        edit_tensors(t)
        save_file(t, f"{dst}/model.safetensors")
    if edit_config:
        c = json.load(open(f"{dst}/config.json"))
        edit_config(c)
        json.dump(c, open(f"{dst}/config.json", "w"))
    return str(dst)


def test_missing_tensor_is_named_before_any_process_starts(tiny_models, tmp_path):
    bad = _copy_with(tiny_models["tiny-gqa"], tmp_path / "m",
                     edit_tensors=lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    r = _cli("hf-to-mcore", "--hf", bad, "--out", str(tmp_path / "out"), "--tp", "2")
    assert r.returncode == 2, r.stderr
    assert "missing tensors: model.layers.1.self_attn.v_proj.weight" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_and_bad_shape(tiny_models, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    bad = _copy_with(tiny_models["tiny-gqa"], tmp_path / "u", edit_tensors=edit,
                     edit_config=lambda c: c.update(intermediate_size=96))
    r = _cli("hf-to-mcore", "--hf", bad, "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "unexpected tensors" in r.stderr and "model.layers.0.self_attn.q_proj.bias" in r.stderr
    assert "model.layers.0.mlp.gate_proj.weight has shape [256, 128] but the config implies [96, 128]" in r.stderr


def test_bad_layouts_and_architecture_rejected_by_the_cli(tiny_models, tmp_path):
    r = _cli("hf-to-mcore", "--hf", tiny_models["tiny-gqa"], "--out", str(tmp_path / "o"), "--tp", "4")
    assert r.returncode == 2 and "num_query_groups (num_key_value_heads=2) is not divisible by tensor_parallel=4" \
        in r.stderr
    r = _cli("hf-to-mcore", "--hf", tiny_models["tiny-wide"], "--out", str(tmp_path / "o"), "--pp", "4")
    assert r.returncode == 2 and "num_hidden_layers=6 is not divisible by pipeline_parallel=4" in r.stderr
    gpt2 = _copy_with(tiny_models["tiny-gqa"], tmp_path / "g", edit_config=lambda c: c.update(model_type="gpt2"))
    r = _cli("hf-to-mcore", "--hf", gpt2, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not LLaMA-like" in r.stderr


def test_mcore_to_hf_rejects_a_config_of_another_model(tiny_models, tp2_checkpoints, tmp_path):
    r = _cli("mcore-to-hf", "--ckpt", tp2_checkpoints["tiny-gqa"], "--hf-config", tiny_models["tiny-tied"],
             "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "was saved from" in r.stderr
    r = _cli("mcore-to-hf", "--ckpt", str(tmp_path), "--hf-config", tiny_models["tiny-gqa"], "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "is not a megatron_async_rlhf checkpoint" in r.stderr
