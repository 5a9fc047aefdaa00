"""Checkpoint integrity: every file fsynced, a sha256 manifest written last, the directory committed by one rename.

A checkpoint directory is complete when it holds ``manifest.json`` (``{"format": 1, "files": {relative path:
{"sha256", "bytes"}}}``, every other file under it, recursively) and every file matches it. ``write_manifest`` hashes
and fsyncs each file, then writes the manifest and fsyncs it and every directory; ``commit`` renames the finished
temporary directory into place and fsyncs the parent, so a crash at any point leaves either the old state or the new
one, never a half-written checkpoint under its final name. ``verify`` finds a truncated, corrupted, missing or added
file and names it. Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj, indent: int | None = None) -> None:
    """``obj`` as JSON in ``path``, flushed to disk (an OSError, e.g. a full disk, is raised here, not later)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def _hash(path: str, sync: bool) -> dict:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
        if sync:  # files another process (megatron's writers) wrote: on disk before the manifest vouches for them
            os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "bytes": n}


def _files(directory: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, n), directory) for n in sorted(names)]
    return out


def write_manifest(directory: str) -> dict:
    """Hash and fsync every file under ``directory``, then write ``manifest.json`` last; fsync every directory."""
    files = {rel: _hash(os.path.join(directory, rel), sync=True) for rel in _files(directory) if rel != MANIFEST}
    manifest = {"format": 1, "files": files}
    write_json(os.path.join(directory, MANIFEST), manifest, indent=0)
    for root, _, _ in os.walk(directory):
        fsync_dir(root)
    return manifest


def verify(directory: str) -> str | None:
    """None if ``directory`` is complete and intact; else what is wrong, naming the file."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return f"{path} is missing (it is written last: the save did not finish)"
    try:
        with open(path) as f:
            listed = json.load(f)["files"]
        if not isinstance(listed, dict):
            raise ValueError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({e})"
    present = set(_files(directory)) - {MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        return f"{os.path.join(directory, extra[0])} is not listed in {MANIFEST} (added after the save)"
    for rel, want in sorted(listed.items()):
        p = os.path.join(directory, rel)
        if rel not in present:
            return f"{p} is missing"
        got = _hash(p, sync=False)
        if got["bytes"] != want.get("bytes"):
            return f"{p} has {got['bytes']} bytes, {MANIFEST} says {want.get('bytes')} (truncated or overwritten)"
        if got["sha256"] != want.get("sha256"):
            return f"{p} does not match its sha256 in {MANIFEST} (corrupted or modified)"
    return None


def commit(tmp: str, final: str) -> None:
    """Rename the finished ``tmp`` to ``final`` (an existing ``final`` is replaced only once ``tmp`` is in place;
    until then it is moved aside under a ``.tmp-`` name, which sweeps remove) and make the rename durable."""
    aside = None
    if os.path.exists(final):
        aside = f"{final}.tmp-old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside:
            os.rename(aside, final)  # the old one back under its name
        raise
    fsync_dir(os.path.dirname(final))
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
