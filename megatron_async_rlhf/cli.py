"""What the command line says about itself: ``--help`` (the modes, the recipes, the options and where every config
field is documented, read from the modes' registry and ``conf/recipe/`` so a new mode or recipe shows up by itself)
and ``--print-config`` (the composed config of a command, without running it). The command line's entry point
(``megatron-async-rlhf``, ``python -m megatron_async_rlhf``): anything else is a run, ``train.main``."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import textwrap

import sys

from megatron_async_rlhf.errors import ConfigError
from megatron_async_rlhf.train import CONF_DIR, load_config


def _first_sentence(text: str) -> str:
    text = " ".join(text.replace("``", "").split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def _modes_help() -> list[tuple[str, str]]:
    """(name, summary) of each registered mode, from its module's docstring, read without importing the module."""
    from megatron_async_rlhf.modes import MODES

    out = []
    for name, module in MODES.items():
        spec = importlib.util.find_spec(module)
        with open(spec.origin) as fh:
            doc = ast.get_docstring(ast.parse(fh.read())) or module
        out.append((name, _first_sentence(doc.split("\n\n")[0]).removeprefix(f"mode={name}: ")))
    return out


def _recipes_help() -> list[tuple[str, str]]:
    """(name, summary) of each recipe in ``conf/recipe/``, from the first sentence of its header comment."""
    out = []
    folder = os.path.join(CONF_DIR, "recipe")
    for f in sorted(os.listdir(folder)):
        if f.endswith(".yaml"):
            with open(os.path.join(folder, f)) as fh:
                lines = [ln[1:].strip() for ln in fh.read().splitlines() if ln.startswith("#")]
            header = " ".join(ln for ln in lines if not ln.startswith("@package"))
            out.append((f[:-5], textwrap.shorten(_first_sentence(header), 190, placeholder=" ...")))
    return out


def usage() -> str:
    """What ``--help`` prints: the modes, the recipes, the overrides and where every field is documented."""
    def table(rows):
        width = max(len(n) for n, _ in rows) + 2
        return "\n".join(textwrap.fill(text, 118, initial_indent=f"  {name:<{width}}",
                                        subsequent_indent=" " * (width + 2)) for name, text in rows)

    return f"""\
usage: megatron-async-rlhf [-h | --help] [--print-config] [recipe=NAME] [section.field=value ...]
       python -m megatron_async_rlhf ...   (the same)

Asynchronous off-policy RLHF: a Megatron-core learner and vLLM rollout engines train and generate at the same time on
disjoint device pools. With no arguments it runs the built-in tiny CPU recipe (about a minute on 2 cores).

Modes (mode=NAME, default rl):
{table(_modes_help())}

Recipes (recipe=NAME, default tiny; conf/recipe/NAME.yaml):
{table(_recipes_help())}

Overrides: section.field=value sets any field of the typed config, in the recipe or not (values are read as YAML).
Every field, with its type, default and meaning, is in the configuration reference docs/configuration.md (generated
from megatron_async_rlhf/config.py by tools/config_reference.py).

Options:
  -h, --help        print this text and exit
  --print-config    print the config the command composes (recipe + overrides, validated) as YAML and exit
                    without running anything; exit 2 with the reason if it is invalid

Examples:
  megatron-async-rlhf                                          # the tiny CPU recipe: async online DPO
  megatron-async-rlhf algorithm.max_staleness=0                # the synchronous baseline, same code
  megatron-async-rlhf recipe=smollm2_math                      # RL on a real pretrained model, ~20 min on CPU
  megatron-async-rlhf mode=sft sft.steps=300                   # supervised only
  megatron-async-rlhf --print-config recipe=rho1b_gsm8k cluster.learner_dp=4

Exit codes: 0 done, 2 a config or input error (printed as "config error: ..."; see docs/troubleshooting.md),
1 a failure while running. Documentation: docs/ (mkdocs build --strict), starting at docs/index.md."""


def print_config(args: list[str]) -> int:
    """``--print-config``: the composed config as YAML, validated for this machine; a config that is valid only on
    a CUDA machine (a GPU recipe on a laptop) is printed with a note saying so."""
    import torch
    import yaml

    cuda = torch.cuda.is_available()
    try:
        cfg = load_config(args, cuda=cuda)
        note = ""
    except ConfigError as e:
        if cuda:
            raise
        try:
            cfg = load_config(args, cuda=True)
        except ConfigError:
            raise e from None
        note = f"# valid on a CUDA machine only; on this one: {str(e).splitlines()[0]}\n"
    print(note + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``--help``, ``--print-config [overrides]``, or a run (``train.main``) with the given overrides."""
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(usage())
        return 0
    if "--print-config" in args:
        try:
            return print_config([a for a in args if a != "--print-config"])
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    from megatron_async_rlhf.train import main as run

    return run(args)
