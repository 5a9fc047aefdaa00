"""tools/gpu_check.py, the one command that checks the learner's CUDA half on a GPU, run here as CI runs it: on the
CPU with a tiny shape. Every check must print its line and pass, and the summary must count them all."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("parity_fp32", "parity_bf16", "weight_sync_gather", "rl_step_bf16", "checkpoint", "hf_step_bf16")


def test_gpu_check_small_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--device", "cpu", "--small",
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # gloo may print its own lines on stdout ("[Gloo] Rank 0 is connected to 0 peer ranks", seen with torch 2.9)
    lines = [line for line in proc.stdout.splitlines() if re.match(r"\w+=", line)]
    assert lines[0].startswith("device=cpu ") and "megatron_core=" in lines[0], lines[0]
    results = dict(re.match(r"(\w+)=(PASS|FAIL)\b", line).groups() for line in lines[1:])
    assert results == {**{c: "PASS" for c in CHECKS}, "gpu_check": "PASS"}, proc.stdout
    assert f"passed={len(CHECKS)}/{len(CHECKS)}" in lines[-1]
    fields = {line.split("=", 1)[0]: dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines[1:]}
    # the fp32 learner is staged for a bf16 engine: 2 bytes per parameter leave it
    assert fields["weight_sync_gather"]["wire_dtype"] == "torch.bfloat16"
    assert int(fields["weight_sync_gather"]["buckets"]) > 3  # several buckets through the reused pack buffers
    for step in ("rl_step_bf16", "hf_step_bf16"):
        assert float(fields[step]["tokens_per_s"]) > 0 and fields[step]["tokens_per_step"] == "256"
    assert not os.path.exists(tmp_path / "work")  # removed afterwards (no --keep)
