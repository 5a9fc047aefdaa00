"""Bad inputs are clear errors before any process starts: exit code 2, the field or the file and line named, the fix
said (issue 22). No processes: ``train.main`` stops in its checks."""

import json
import os

import pytest

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.train import load_config, main


def _rows(n=20, **override):
    rows = [{"question": f"Q: {i % 10}+1= A:", "answer": str(i % 10 + 1)} for i in range(n)]
    for i, row in override.items():
        rows[int(i.removeprefix("row"))] = row
    return rows


def _data_dir(tmp_path, train_lines=None, **override):
    d = tmp_path / "data"
    d.mkdir()
    lines = train_lines if train_lines is not None else [json.dumps(r) for r in _rows(**override)]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    (d / "test.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(8)) + "\n")
    return str(d)


def _main(tmp_path, capsys, *overrides) -> str:
    assert main([f"logging.out_dir={tmp_path / 'run'}", *overrides]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("broken,why", [('{"question": "Q: 2+2= A:", "answer": ', "not valid JSON"),
                                        ('["Q: 2+2= A:", "4"]', "a JSON list, not an object")])
def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, capsys, broken, why):
    lines = [json.dumps(r) for r in _rows()]
    lines[2] = broken  # the third line
    src = _data_dir(tmp_path, lines)
    err = _main(tmp_path, capsys, f"data.source={src}")
    assert f"{src}/train.jsonl line 3: {why}" in err and "Fix:" in err
    single = tmp_path / "one.jsonl"  # a single file as the source
    single.write_text("\n".join(lines) + "\n")
    err = _main(tmp_path, capsys, f"data.source={single}")
    assert f"{single} line 3: {why}" in err


def test_a_source_datasets_cannot_load_is_named(tmp_path, capsys):
    bad = tmp_path / "rows.parquet"
    bad.write_bytes(b"not parquet at all")
    err = _main(tmp_path, capsys, f"data.source={bad}")
    assert f"data.source='{bad}'" in err and "could not be loaded by datasets" in err and "Fix:" in err


@pytest.mark.parametrize("row,message", [
    ({"question": None, "answer": "2"}, "data.prompt_key 'question' is missing (null)"),
    ({"answer": "2"}, "data.prompt_key 'question' is missing (null)"),  # absent from one row: datasets fills null
    ({"question": ["Q", "A"], "answer": "2"}, "data.prompt_key 'question' is a list, not text"),
    ({"question": "Q: 1+1= A:", "answer": None}, "data.answer_key 'answer' is missing (null)"),
    ({"question": "Q: 1+1= A:", "answer": {"text": "2"}}, "data.answer_key 'answer' is a dict, not an answer"),
])
def test_a_null_or_odd_prompt_or_answer_is_named_by_row(tmp_path, capsys, row, message):
    src = _data_dir(tmp_path, row5=row)
    err = _main(tmp_path, capsys, f"data.source={src}")
    assert f"row 5 of {src} (split 'train')" in err and message in err and "Fix:" in err


def test_a_conversation_without_an_assistant_turn_is_named(tmp_path, capsys):
    def row(i, turns):
        return {"question": f"Q: {i}+1= A:", "messages": turns}

    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "2"}]
    lines = [json.dumps(row(i, ok)) for i in range(20)]
    lines[7] = json.dumps(row(7, [{"role": "user", "content": "hi"}]))
    src = _data_dir(tmp_path, lines)
    (tmp_path / "data" / "test.jsonl").write_text("\n".join(lines[:4]) + "\n")
    err = _main(tmp_path, capsys, f"data.source={src}", "data.answer_key=messages")
    assert f"row 7 of {src}" in err and "a conversation with no assistant turn (roles: ['user'])" in err


def test_the_reward_model_is_checked_before_any_engine_starts(tmp_path, capsys, tiny_models):
    rm = ["reward.kind=reward_model", "data.answer_key="]
    err = _main(tmp_path, capsys, *rm, f"reward.reward_model_path={tmp_path / 'nope'}")
    assert f"reward.reward_model_path='{tmp_path / 'nope'}': no HF reward model there (no such directory)" in err
    err = _main(tmp_path, capsys, *rm, f"reward.reward_model_path={tiny_models['tiny-gqa']}")
    assert "is not a reward model" in err and "LlamaForCausalLM" in err and "ForSequenceClassification" in err


@pytest.mark.parametrize("override,message", [
    ("algorithm.lr=0", "algorithm.lr=0.0 must be > 0"),
    ("algorithm.lr=-1e-5", "algorithm.lr=-1e-05 must be > 0"),
    ("algorithm.online_dpo.beta=0", "algorithm.online_dpo.beta=0.0 must be > 0"),
    ("algorithm.top_p=0", "algorithm.top_p=0.0 must be in (0, 1]"),
    ("algorithm.top_p=1.2", "algorithm.top_p=1.2 must be in (0, 1]"),
    ("rollout.dtype=fp16", "rollout.dtype='fp16': use one of ['float32', 'bfloat16', 'float16', 'auto']"),
    ("logging.wandb_mode=ofline", "logging.wandb_mode='ofline': use one of ['offline', 'online', 'disabled']"),
    ("sft.lr=0", "sft.lr=0.0"),
    ("cluster.max_run_s=0", "cluster.max_run_s=0.0 must be > 0, or null for no limit"),
])
def test_bad_values_are_named(tmp_path, capsys, override, message):
    assert message in _main(tmp_path, capsys, override)


def test_no_run_time_limit_unless_set():
    assert load_config([]).cluster.max_run_s is None
    assert load_config(["cluster.max_run_s=7200"]).cluster.max_run_s == 7200.0
    assert load_config(["cluster.max_run_s=null"]).cluster.max_run_s is None


@pytest.mark.parametrize("world_size,message", [("3", "WORLD_SIZE=3, but this run needs 2 processes"),
                                                ("two", "WORLD_SIZE='two' (set by the launcher) is not a number")])
def test_a_wrong_torchrun_world_size_is_a_config_error(tmp_path, capsys, monkeypatch, world_size, message):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", world_size)
    err = _main(tmp_path, capsys)
    assert message in err and "torchrun --nnodes=N --nproc_per_node=M" in err


def test_check_launch_world_accepts_the_right_size(monkeypatch):
    from megatron_async_rlhf.launch import check_launch_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch_world(2)
    with pytest.raises(ConfigError, match="needs 4 processes"):
        check_launch_world(4)


def _master_port():
    return int(os.environ["MASTER_PORT"])


def test_the_store_binds_its_own_port():
    """No probe-then-bind race: the launcher's store listens on a port the kernel gave it (port 0), and the workers
    reach it there."""
    from megatron_async_rlhf.launch import WorkerGroup

    with WorkerGroup(1, timeout_s=120, default_group=False) as group:
        assert group.run(_master_port) == [group._store.port] and group._store.port > 0
