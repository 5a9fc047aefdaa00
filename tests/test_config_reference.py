"""docs/configuration.md is generated from the typed config (tools/config_reference.py): every field has a docstring,
and the file on disk is what the config generates now."""

import dataclasses
import importlib.util
import os
import sys

from megatron_async_rlhf.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("config_reference", os.path.join(ROOT, "tools", "config_reference.py"))
ref = sys.modules["config_reference"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(ref)


def test_every_config_field_has_a_docstring():
    missing = ref.missing_docs(RunConfig)
    assert not missing, (f"config fields without a docstring (add a string literal right after each field, in "
                         f"megatron_async_rlhf/config.py or the algorithm's Config): {missing}")


def test_reference_lists_every_field_with_dotted_names():
    entries = ref.walk(RunConfig)
    names = {e.name for e in entries}
    assert {"mode", "seed", "resume", "algorithm.max_staleness", "algorithm.online_dpo.beta",
            "algorithm.ppo_critic.clip_eps", "rollout.vllm.kv_cache_gib", "cluster.learner_tp"} <= names
    sections = {e.name for e in entries if e.section}
    assert {"algorithm", "algorithm.online_dpo", "algorithm.grpo", "rollout", "rollout.vllm"} <= sections
    text = ref.generate(RunConfig)
    for e in entries:
        assert (f"{'#' * min(2 + e.depth, 6)} {e.name}\n" if e.section else f"**`{e.name}`**") in text, e.name
    assert "- **`rollout.vllm.extra`** (`dict`, default `{}`)" in text  # default_factory called
    assert "- **`algorithm.online_dpo.beta`** (`float`, default `0.1`)" in text
    assert "recipe=NAME" in text and "section.field=value" in text and ref.COMMAND in text


def test_docs_configuration_md_is_current():
    path = os.path.join(ROOT, ref.OUT)
    assert os.path.exists(path), f"{ref.OUT} is missing. Generate it with: {ref.COMMAND}"
    with open(path) as fh:
        on_disk = fh.read()
    assert on_disk == ref.generate(RunConfig), (f"{ref.OUT} is stale (the config's fields or docstrings changed). "
                                                f"Regenerate it with: {ref.COMMAND}")


def test_walker_reports_a_missing_docstring_and_inherited_ones():
    @dataclasses.dataclass(kw_only=True)
    class Base:
        inherited: int = 1
        """Declared in the base class."""

    @dataclasses.dataclass(kw_only=True)
    class Inner(Base):
        """A nested section."""

        documented: float = 0.5
        """Has one."""
        undocumented: str = "x"

    @dataclasses.dataclass(kw_only=True)
    class Outer:
        top: bool = True
        """A top-level field."""
        inner: Inner = dataclasses.field(default_factory=Inner)
        bare: list = dataclasses.field(default_factory=lambda: [1, 2])

    assert ref.missing_docs(Outer) == ["bare", "inner.undocumented"]
    docs = {e.name: e for e in ref.walk(Outer)}
    assert docs["inner.inherited"].doc == "Declared in the base class."
    assert docs["inner"].section and docs["inner"].doc == "A nested section."  # the class's own docstring
    assert docs["bare"].default == "[1, 2]" and docs["inner.documented"].default == "0.5"
    text = ref.generate(Outer)
    assert "## inner\n" in text and "- **`inner.undocumented`** (`str`, default `\"x\"`)" in text


def test_check_command_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    """``--check`` returns 0 on the committed file and 1, naming the command to regenerate, when the file differs
    (pointed at a copy under tmp_path, so the repository's file is not touched); writing makes it current again."""
    assert ref.main(["--check"]) == 0, capsys.readouterr().err
    monkeypatch.setattr(ref, "ROOT", str(tmp_path))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "configuration.md").write_text("# stale\n")
    assert ref.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/configuration.md is stale" in err and f"Regenerate it with: {ref.COMMAND}" in err
    assert ref.main([]) == 0
    assert ref.main(["--check"]) == 0
