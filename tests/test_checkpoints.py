"""Checkpoints that are never deleted by a fresh run, hold no pickle, are verified by a manifest, fall back past a
corrupted newest one, and survive a failed save (issue 22). No processes: the files are written by the same
functions a real save calls (``run_state.write_checkpoint``, ``manifest``), the learner's part replaced by a file."""

import dataclasses
import errno
import json
import os
import pickle
import random

import pytest

from megatron_async_rlhf import run_state
from megatron_async_rlhf.learner import manifest
from megatron_async_rlhf.errors import CheckpointError, ConfigError


def _cfg(out, *overrides):
    from megatron_async_rlhf.train import load_config

    return load_config([f"logging.out_dir={out}", "algorithm.steps=10", *overrides], cuda=False)


def _reference(out):
    ref = os.path.join(run_state.checkpoints_dir(out), run_state.REFERENCE)
    os.makedirs(ref, exist_ok=True)
    with open(os.path.join(ref, "weights.bin"), "wb") as f:
        f.write(b"reference weights")
    manifest.write_manifest(ref)


def _checkpoint(out, step, keep=10, batch=None):
    """A checkpoint as ``run_state.save`` writes it, with a file standing in for the learner's model/ directory."""
    cfg = _cfg(out)
    if not os.path.exists(os.path.join(run_state.checkpoints_dir(out), run_state.REFERENCE)):
        _reference(out)
    final = os.path.join(run_state.checkpoints_dir(out), f"step_{step:06d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(os.path.join(tmp, run_state.MODEL))
    with open(os.path.join(tmp, run_state.MODEL, "__0_0.distcp"), "wb") as f:
        f.write(os.urandom(4096))
    files = {run_state.RNG: {"data_cursor": random.Random(step).getstate(), "ranks": [run_state.capture_rng()]},
             run_state.RUN_STATE: {"step": step, "config": dataclasses.asdict(cfg), "batch_saved": batch is not None,
                                   "schedule": {"version": step}}}
    if batch is not None:
        files[run_state.BATCH] = batch
    run_state.write_checkpoint(tmp, final, step, files, out, keep)
    return final


class _CreatesAFile:
    """Unpickling this creates ``path``: what a forged checkpoint could run instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


# ----- 1. no silent deletion --------------------------------------------------------------------------------------
def test_a_fresh_run_in_a_directory_with_checkpoints_stops_and_keeps_them(tmp_path, capsys):
    from megatron_async_rlhf.train import main

    out = str(tmp_path)
    newest = _checkpoint(out, 4)
    assert main([f"logging.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "resume=auto" in err and "new logging.out_dir" in err and "checkpoint.overwrite=true" in err
    assert manifest.verify(newest) is None  # still there, intact
    with pytest.raises(ConfigError, match="resume is unset"):  # the worker refuses too, should the preflight be skipped
        run_state.open_run(_cfg(out), is_controller=True)
    assert manifest.verify(newest) is None
    # explicit: overwrite deletes them; resume=auto continues them
    assert run_state.open_run(_cfg(out, "resume=auto"), is_controller=True)[0] == newest
    run_state.check_fresh_start(_cfg(out, "checkpoint.overwrite=true"))
    assert run_state.open_run(_cfg(out, "checkpoint.overwrite=true"), is_controller=True) == ("", None)
    assert not os.path.exists(newest)


# ----- 2. no pickle, verified, atomic -----------------------------------------------------------------------------
def test_state_files_are_json_and_round_trip_exactly(tmp_path):
    import numpy as np
    import torch

    from megatron_async_rlhf.data.tasks import Row
    from megatron_async_rlhf.rollout.base import Sample
    from megatron_async_rlhf.schedules import Batch

    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    state = run_state.capture_rng()
    expected = (torch.rand(3), random.random(), np.random.standard_normal(2))
    batch = Batch(3, [Sample(0, [1, 2], [5, 6], [-0.1234567891234, float("-inf")], "stop", 2, engine=1, reward=0.5),
                      None], [Row("Q: 1+1= A:", "2")], 1.25, 2, stats={"staleness": 1})
    final = _checkpoint(str(tmp_path), 2, batch=batch)
    assert sorted(os.listdir(final)) == ["batch.json", "manifest.json", "model", "rng.json", "run_state.json"]
    for name in ("batch.json", "rng.json", "run_state.json"):
        with open(os.path.join(final, name)) as f:
            json.load(f)  # plain JSON
    rng, loaded = run_state.read_state_files(final, batch_saved=True)
    assert loaded == batch
    decoded = run_state.from_json(json.loads(json.dumps(run_state.to_json(state))))
    run_state.restore_rng(decoded)
    again = (torch.rand(3), random.random(), np.random.standard_normal(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and (expected[2] == again[2]).all()
    stream = random.Random()
    stream.setstate(tuple(rng["data_cursor"]))
    assert stream.random() == random.Random(2).random()


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "extra_file"])
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog, damage):
    out = str(tmp_path)
    older, newest = _checkpoint(out, 2), _checkpoint(out, 4)
    bad = os.path.join(newest, run_state.RNG)
    if damage == "truncate":
        os.truncate(bad, os.path.getsize(bad) // 2)
    elif damage == "flip":
        with open(bad, "r+b") as f:
            f.seek(10)
            c = f.read(1)
            f.seek(10)
            f.write(bytes([c[0] ^ 1]))
    elif damage == "no_manifest":  # killed before the manifest, the save's last file
        os.remove(bad := os.path.join(newest, manifest.MANIFEST))
    else:
        with open(bad := os.path.join(newest, "rng.pkl"), "wb") as f:
            f.write(b"x")
    with caplog.at_level("WARNING"):
        assert run_state.find_resume(_cfg(out, "resume=auto")) == older
    assert bad in caplog.text and "falling back" in caplog.text
    with pytest.raises(ConfigError, match=f"not an intact checkpoint: {bad}"):
        run_state.find_resume(_cfg(out, f"resume={newest}"))


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    out = str(tmp_path)
    only = _checkpoint(out, 2)
    os.truncate(os.path.join(only, run_state.RUN_STATE), 3)
    with pytest.raises(ConfigError, match="no intact checkpoint.*run_state.json"):
        run_state.find_resume(_cfg(out, "resume=auto"))
    assert os.path.exists(only)


def test_a_checkpoint_whose_state_files_are_pickles_is_refused_and_runs_nothing(tmp_path):
    out, marker = str(tmp_path / "run"), str(tmp_path / "pwned")
    older, newest = _checkpoint(out, 2), _checkpoint(out, 4)
    payload = pickle.dumps(_CreatesAFile(marker))
    for name in (run_state.RNG, run_state.RUN_STATE, "rng.pkl", "batch.pkl"):  # the old names too
        with open(os.path.join(newest, name), "wb") as f:
            f.write(payload)
    assert run_state.find_resume(_cfg(out, "resume=auto")) == older  # the manifest does not vouch for them
    manifest.write_manifest(newest)  # a forger who rewrites the manifest too
    with pytest.raises(ConfigError, match="run_state.json is not a state file of this project"):
        run_state.find_resume(_cfg(out, f"resume={newest}"))
    with pytest.raises(ConfigError, match="rng.json is not a state file of this project"):
        run_state.read_state_files(newest, batch_saved=False)
    # a JSON file that names a class to build: only the few a checkpoint holds
    with open(os.path.join(newest, run_state.RNG), "w") as f:
        json.dump({"__mrlhf__": "dataclass", "class": "Popen", "fields": {"args": ["touch", marker]}}, f)
    with pytest.raises(ConfigError, match="'Popen' is not one a checkpoint holds"):
        run_state.read_state_files(newest, batch_saved=False)
    assert not os.path.exists(marker)


def test_torch_metadata_pickles_are_read_with_checkpoint_classes_only(tmp_path):
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties, \
        TensorStorageMetadata

    from megatron_async_rlhf.learner.checkpoint import check_pickles

    good, bad, marker = tmp_path / "good", tmp_path / "bad", str(tmp_path / "pwned")
    good.mkdir(), bad.mkdir()
    md = Metadata({"w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([2, 2]),
                                              [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 2]))])})
    (good / ".metadata").write_bytes(pickle.dumps(md))
    check_pickles(str(good))
    (bad / ".metadata").write_bytes(pickle.dumps(_CreatesAFile(marker)))
    with pytest.raises(ConfigError, match=r"\.metadata is not torch checkpoint metadata \(global io.open is not"):
        check_pickles(str(bad))
    (bad / ".metadata").unlink()
    (bad / "common.pt").write_bytes(pickle.dumps(_CreatesAFile(marker)))  # torch.load would run a plain pickle
    with pytest.raises(ConfigError, match=r"common\.pt is not torch checkpoint metadata"):
        check_pickles(str(bad))
    torch.save({"optimizer": {"step": torch.tensor(2.0)}}, good / "common.pt")
    check_pickles(str(good))
    assert not os.path.exists(marker)


def test_a_failed_save_is_a_clear_error_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    previous = _checkpoint(out, 2)
    real, calls = manifest.write_json, []

    def disk_full_on_second_file(path, obj, indent=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "w") as f:
                f.write(json.dumps(obj)[:7])  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, obj, indent)

    monkeypatch.setattr(manifest, "write_json", disk_full_on_second_file)
    with pytest.raises(CheckpointError) as e:
        _checkpoint(out, 4)
    msg = str(e.value)
    assert "step_000004 could not be written" in msg and "No space left on device" in msg
    assert f"the previous checkpoint {previous} is intact" in msg and "Fix: free space" in msg
    assert sorted(os.listdir(run_state.checkpoints_dir(out))) == ["reference", "step_000002"]  # no half checkpoint
    assert manifest.verify(previous) is None
    monkeypatch.undo()
    assert run_state.find_resume(_cfg(out, "resume=auto")) == previous


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path):
    out = str(tmp_path)
    for step in (2, 4, 6):
        _checkpoint(out, step, keep=2)
    assert [s for s, _ in run_state.complete_checkpoints(out)] == [4, 6]
    # resumed from step 4 (say step 6 was damaged) and saved step 4 again with keep=1: older ones go, it stays
    _checkpoint(out, 4, keep=1)
    assert [s for s, _ in run_state.complete_checkpoints(out)] == [4, 6]
    assert all(manifest.verify(d) is None for _, d in run_state.complete_checkpoints(out))
    assert not [n for n in os.listdir(run_state.checkpoints_dir(out)) if ".tmp-" in n]


def test_the_reference_beside_a_checkpoint_is_verified_too(tmp_path):
    out = str(tmp_path)
    _checkpoint(out, 2)
    ref = os.path.join(run_state.checkpoints_dir(out), run_state.REFERENCE, "weights.bin")
    with open(ref, "ab") as f:
        f.write(b"!")
    with pytest.raises(ConfigError, match=f"reference policy beside it is not intact: {ref}"):
        run_state.find_resume(_cfg(out, "resume=auto"))
