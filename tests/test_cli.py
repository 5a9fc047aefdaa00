"""The command line says what it can do: ``--help`` lists the modes, the recipes and where the configuration
reference is; ``--print-config`` prints the composed config without running anything (issue 23)."""

import os
import subprocess
import sys

import yaml

from megatron_async_rlhf.modes import MODES
from megatron_async_rlhf.cli import CONF_DIR
from megatron_async_rlhf.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_modes_recipes_and_the_reference(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    recipes = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "recipe")) if f.endswith(".yaml"))
    assert recipes and MODES
    for name in [*MODES, *recipes]:
        assert f"\n  {name} " in out, f"{name} is not listed in --help"
    assert "docs/configuration.md" in out and os.path.exists(os.path.join(ROOT, "docs", "configuration.md"))
    assert "--print-config" in out and "docs/troubleshooting.md" in out
    assert os.path.exists(os.path.join(ROOT, "docs", "troubleshooting.md"))


def test_python_dash_m_help_runs():
    """``python -m megatron_async_rlhf --help`` in a fresh process (the console script calls the same main)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "megatron_async_rlhf", "-h"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Modes (mode=NAME" in p.stdout and "Recipes (recipe=NAME" in p.stdout


def test_print_config_composes_without_running(capsys, tmp_path):
    out_dir = tmp_path / "never_made"
    assert main(["--print-config", "recipe=smollm2_math", "algorithm.max_staleness=0",
                 f"logging.out_dir={out_dir}"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["path"] == "smollm2-135m-instruct" and cfg["algorithm"]["max_staleness"] == 0
    assert cfg["logging"]["out_dir"] == str(out_dir) and not out_dir.exists()  # nothing ran


def test_print_config_of_a_gpu_recipe_on_cpu_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--print-config", "recipe=llama3_8b_chat"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# valid on a CUDA machine only") and yaml.safe_load(out)["cluster"]["learner_tp"] == 4


def test_print_config_of_a_bad_config_is_a_config_error(capsys):
    assert main(["--print-config", "algorithm.max_staleness=-1"]) == 2
    assert "algorithm.max_staleness=-1 must be >= 0" in capsys.readouterr().err
