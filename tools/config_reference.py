"""Write the configuration reference ``docs/configuration.md`` from the typed config
(``megatron_async_rlhf/config.py``).

Walks ``RunConfig``'s fields recursively at runtime; each field's docstring is the string literal right after it in
the source of the class that declares it (a base class's fields: that base), or ``field(metadata={"doc": ...})``
for fields made without source (``AlgorithmConfig``'s per-algorithm sections). A section's text is its field's
docstring, else its class's docstring.

    python tools/config_reference.py           # (re)write docs/configuration.md
    python tools/config_reference.py --check   # exit 1 if docs/configuration.md is stale or a field has no docstring
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import os
import sys
import textwrap
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("docs", "configuration.md")
COMMAND = "python tools/config_reference.py"


@dataclasses.dataclass
class Entry:
    """One field of the config: a value (``section=False``) or a nested section."""

    name: str
    """Dotted name as written on the command line, e.g. ``algorithm.online_dpo.beta``."""
    type: str
    default: str
    """The default as it would be written in an override (JSON/YAML); empty for a section."""
    doc: str
    section: bool = False
    depth: int = 0
    """Nesting depth of the field's parent section (0: a top-level field of the walked class)."""


@functools.lru_cache(maxsize=None)
def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the fields ``cls`` itself declares: an annotated assignment followed by a string
    constant, read from the class's source. Classes without source (``make_dataclass``) give ``{}``."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = ast.parse(src).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs = {}
    for a, b in zip(node.body, node.body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


@functools.lru_cache(maxsize=None)
def class_doc(cls: type) -> str:
    """The class's own docstring as written in its source (not the signature dataclasses put in ``__doc__``)."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    except (OSError, TypeError):  # no source (make_dataclass): a docstring set by hand, not the generated signature
        doc = cls.__doc__ or ""
        return "" if doc.startswith(cls.__name__ + "(") else inspect.cleandoc(doc)
    return (ast.get_docstring(node) or "") if isinstance(node, ast.ClassDef) else ""


def field_doc(cls: type, f: dataclasses.Field) -> str:
    """The docstring of field ``f`` of ``cls``: ``metadata["doc"]``, else the attribute docstring in the class of the
    MRO that declares the field."""
    if f.metadata.get("doc"):
        return inspect.cleandoc(f.metadata["doc"])
    for klass in cls.__mro__:
        if f.name in vars(klass).get("__annotations__", {}):
            return attribute_docs(klass).get(f.name, "")
    return ""


def _type_name(t) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def _format_default(v) -> str:
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def walk(cls: type, prefix: str = "", depth: int = 0) -> list[Entry]:
    """Every field of dataclass ``cls``, recursively: a nested dataclass field is a section entry followed by its own
    fields. Value fields come before the nested sections at each level."""
    hints = typing.get_type_hints(cls)
    values, sections = [], []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        t = hints.get(f.name, f.type)
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            doc = field_doc(cls, f) or class_doc(t)
            sections.append(Entry(name, t.__qualname__, "", doc, section=True, depth=depth))
            sections.extend(walk(t, name + ".", depth + 1))
            continue
        if f.default is not dataclasses.MISSING:
            default = _format_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _format_default(f.default_factory())
        else:
            default = "(required)"
        values.append(Entry(name, _type_name(f.type), default, field_doc(cls, f), depth=depth))
    return values + sections


def missing_docs(cls: type) -> list[str]:
    """Dotted names of the fields (sections included) of ``cls`` that have no docstring."""
    return [e.name for e in walk(cls) if not e.doc.strip()]


def _markdown(doc: str, indent: str = "") -> str:
    """A docstring as Markdown: each paragraph's lines joined, paragraphs separated by a blank line."""
    paras = [" ".join(line.strip() for line in p.splitlines()) for p in doc.strip().split("\n\n")]
    return ("\n\n" + indent).join(p for p in paras if p)


HEADER = f"""\
# Configuration reference

<!-- Generated by `{COMMAND}` from megatron_async_rlhf/config.py and the algorithms' `Config` classes
(megatron_async_rlhf/algorithms/*.py). Do not edit by hand: edit the field docstrings and regenerate. -->

This page is generated from the typed configuration (`megatron_async_rlhf/config.py`, and each algorithm's `Config`
in `megatron_async_rlhf/algorithms/`) by `{COMMAND}`; `tests/test_config_reference.py` fails when it is stale or a
field has no docstring. Every field below is listed with its type and default.

A run composes `conf/config.yaml` with a recipe (`conf/recipe/NAME.yaml`), then applies overrides written with the
dotted names below:

```bash
python -m megatron_async_rlhf recipe=NAME section.field=value ...
python -m megatron_async_rlhf recipe=tiny algorithm.max_staleness=0 algorithm.online_dpo.beta=0.05
```

`recipe=NAME` picks `conf/recipe/NAME.yaml`; `section.field=value` sets any field, present in the recipe or not
(values are read as YAML: `true`, `null`, `1e-5`); an unknown field is an error naming the known ones.
"""


def generate(cls: type | None = None) -> str:
    """The text of ``docs/configuration.md`` for ``cls`` (default: ``RunConfig``)."""
    if cls is None:
        from megatron_async_rlhf.config import RunConfig

        cls = RunConfig
    entries = walk(cls)
    out = [HEADER]
    top = [e for e in entries if e.depth == 0 and not e.section]
    if top:
        out.append("## Top-level fields\n")
        out.extend(_item(e) for e in top)
        out.append("")
    for e in entries:
        if e.depth == 0 and not e.section:
            continue
        if e.section:
            out.append(f"{'#' * min(2 + e.depth, 6)} {e.name}\n")
            if e.doc:
                out.append(_markdown(e.doc) + "\n")
            continue
        out.append(_item(e))
        if _last_in_list(entries, e):
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _item(e: Entry) -> str:
    return f"- **`{e.name}`** (`{e.type}`, default `{e.default}`): {_markdown(e.doc, '  ')}"


def _last_in_list(entries: list[Entry], e: Entry) -> bool:
    i = entries.index(e)
    return i + 1 == len(entries) or entries[i + 1].section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--check", action="store_true",
                   help=f"do not write: exit 1 if {OUT} differs from what would be generated")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from megatron_async_rlhf.config import RunConfig

    missing = missing_docs(RunConfig)
    text = generate(RunConfig)
    path = os.path.join(ROOT, OUT)
    rc = 0
    if args.check:
        old = open(path).read() if os.path.exists(path) else ""
        if old != text:
            diff = list(difflib.unified_diff(old.splitlines(), text.splitlines(), OUT + " (on disk)",
                                             OUT + " (generated)", lineterm="", n=1))
            print("\n".join(diff[:40] + (["..."] if len(diff) > 40 else [])), file=sys.stderr)
            print(f"{OUT} is stale (it differs from the config's fields and docstrings). Regenerate it with: "
                  f"{COMMAND}", file=sys.stderr)
            rc = 1
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        print(f"wrote {OUT} ({sum(not e.section for e in walk(RunConfig))} fields)")
    if missing:
        print(f"config fields without a docstring (add one after the field): {', '.join(missing)}", file=sys.stderr)
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
