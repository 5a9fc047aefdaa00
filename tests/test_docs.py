"""The documentation builds and stays within its limits (issue 23): the site in docs/ builds with warnings as errors,
every page of the nav exists, and the README is short, starts with the commands and points nowhere outside the
repository."""

import importlib.util
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing nav page, a page left out of the nav or a bad anchor is
    a warning, and a warning fails the build."""
    assert importlib.util.find_spec("material"), "mkdocs-material is missing: the dev extra has it (tools/install.sh)"
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # mkdocs-material's banner about MkDocs 2
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout}\n{p.stderr}"
    assert "WARNING" not in p.stderr, p.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
    with open(README) as fh:  # the README is not part of the site: check its links into the site's sections here
        for target in LINK.findall(fh.read()):
            page, _, anchor = target.partition("#")
            if page.startswith("docs/") and anchor:
                rel = page[len("docs/"):-len(".md")]
                html = tmp_path / "site" / ("index.html" if rel == "index" else os.path.join(rel, "index.html"))
                assert f'id="{anchor}"' in html.read_text(), f"README.md links to a missing section: {target}"


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    with open(os.path.join(ROOT, "mkdocs.yml")) as fh:
        nav = _nav_pages(yaml.safe_load(fh)["nav"])
    docs = os.path.join(ROOT, "docs")
    missing = [p for p in nav if not os.path.isfile(os.path.join(docs, p))]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist under docs/: {missing}"
    on_disk = sorted(os.path.relpath(os.path.join(d, f), docs) for d, _, fs in os.walk(docs) for f in fs
                     if f.endswith(".md"))
    assert not set(on_disk) - set(nav), f"pages under docs/ missing from the nav: {sorted(set(on_disk) - set(nav))}"
    for page in ["index.md", "configuration.md", "recipes.md", "tools.md", "results.md", "troubleshooting.md",
                 "reward-models.md", "weight_sync.md", "code-map.md", "concepts/schedules.md", "getting-started/laptop.md",
                 "getting-started/gpu-node.md", "getting-started/slurm.md"]:
        assert page in nav, page


def test_readme_is_short_and_starts_with_the_commands():
    with open(README) as fh:
        text = fh.read()
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; at most 150 (details go to docs/)"
    head = "\n".join(lines[:8])
    for command in ["bash tools/install.sh && .venv/bin/python -m megatron_async_rlhf ",
                    "bash tools/install.sh && .venv/bin/python -m pytest -q",
                    "bash tools/install.sh && .venv/bin/python -m megatron_async_rlhf recipe=smollm2_math"]:
        assert command in head, f"README.md must start with: {command}"


def test_readme_points_nowhere_outside_the_repository():
    with open(README) as fh:
        text = fh.read()
    assert "../" not in text and "/work/" not in text, "README.md names a path outside the repository"
    for target in LINK.findall(text):
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"external link {target}"
        path = target.split("#")[0]
        assert path and os.path.exists(os.path.join(ROOT, path)), f"README.md links to a missing file: {target}"


def test_readme_headline_numbers_are_on_the_results_page():
    """Every number in the README's headline table is measured on docs/results.md (with its command and date)."""
    with open(README) as fh:
        readme = fh.read()
    with open(os.path.join(ROOT, "docs", "results.md")) as fh:
        results = fh.read()
    section = readme.split("## Headline numbers", 1)[1].split("\n## ", 1)[0]
    numbers = re.findall(r"(?<![\w.])\d+\.\d+", section)
    assert numbers, "the README's headline numbers section is gone"
    assert not [n for n in numbers if n not in results], "README numbers missing from docs/results.md"


def test_troubleshooting_covers_every_error_family():
    with open(os.path.join(ROOT, "docs", "troubleshooting.md")) as fh:
        headings = [line[3:] for line in fh.read().splitlines() if line.startswith("## ")]
    for family in ["Command line and config fields", "Layout and devices", "Model", "Data", "Checkpoints and resume",
                   "Launch (torchrun, Slurm)", "Rollout engines", "The run stops on a number"]:
        assert family in headings, family
