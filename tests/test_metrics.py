"""Metrics keep every step: JSONL rows per phase, and the offline wandb run read back holds every logged row with a
monotone per-phase step (the warm start's steps 0..S used to make wandb drop the first S RL steps)."""

import glob
import json
import struct
import time

from megatron_async_rlhf.metrics import Metrics


def wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline ``.wandb`` file (a LevelDB-style log of protobuf Records: 7-byte header, 32 KiB
    blocks, each chunk = crc32 (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, rows, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_keeps_every_phase_step(tmp_path):
    m = Metrics(str(tmp_path), {"x": 1}, wandb_mode="offline", total_steps=10)
    for s in range(20):
        m.log(s, "sft", loss=1.0 / (s + 1))
    m.log(0, "eval", accuracy=0.1)
    for s in range(1, 11):
        m.log(s, "rl", reward_mean=s / 10, lr=8e-7 * s, loss=0.123456789)
    m.log(10, "eval", accuracy=0.5)
    m.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 32
    from google.protobuf.message import DecodeError

    run_file = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))[0]
    deadline = time.time() + 30
    while True:  # wandb's service may still be writing the file's tail after finish() returned: seen twice, once
        try:  # with its last 3 rows missing, once with a half-written record
            hist = wandb_history(run_file)
        except DecodeError:
            if time.time() > deadline:
                raise
            hist = []
        if len(hist) >= 32 or time.time() > deadline:
            break
        time.sleep(0.5)
    for phase, steps in (("sft", list(range(20))), ("rl", list(range(1, 11))), ("eval", [0, 10])):
        got = [h[f"{phase}/step"] for h in hist if f"{phase}/step" in h]
        assert got == steps, (phase, got)
    assert [h["rl/reward_mean"] for h in hist if "rl/reward_mean" in h] == [s / 10 for s in range(1, 11)]
    assert [h["_step"] for h in hist] == list(range(32))  # wandb's own axis only grows: nothing dropped
    # 7 significant digits in both sinks: a small learning rate keeps its digits
    lrs = [float(f"{8e-7 * s:.7g}") for s in range(1, 11)]
    assert [h["rl/lr"] for h in hist if "rl/lr" in h] == lrs and lrs[0] == 8e-7 and lrs[2] == 2.4e-6
    assert [r["lr"] for r in rows if r["phase"] == "rl"] == lrs
    assert {r["loss"] for r in rows if r["phase"] == "rl"} == {0.1234568}
    assert '"lr": 8e-07,' in open(tmp_path / "metrics.jsonl").read()


def test_seven_significant_digits():
    from megatron_async_rlhf.metrics import significant

    assert significant(8e-7) == 8e-7 and significant(1.23456789e-9) == 1.234568e-9
    assert significant(123456789.0) == 123456800.0 and significant(-0.5) == -0.5 and significant(0.0) == 0.0
    assert significant(float("inf")) == float("inf") and significant(float("nan")) != significant(float("nan"))


def test_rl_row_lr_is_the_optimizers():
    """modes/rl.py logs the rate the optimizer trained with: the base rate, not a param group's scaled one."""
    import torch

    from megatron_async_rlhf.learner.train import set_lr
    from megatron_async_rlhf.modes.rl import _lr

    w, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [head], "lr_mult": 10.0}], lr=1.0)
    set_lr(opt, 8e-7)
    assert _lr(opt) == 8e-7 and opt.param_groups[1]["lr"] == 8e-6
    assert set_lr(opt, 1e-3, "linear", done=5, total=10) == 5e-4 and _lr(opt) == 5e-4
