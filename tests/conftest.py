"""Shared, expensive fixtures: tiny HF models made once, and one group of 4 learner processes for every parallel
test (megatron-core's import costs 6-8 s a process, so the group is started once per session)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """preset name -> HF directory."""
    from megatron_async_rlhf.models.tiny import PRESETS, make_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    return {p: make_tiny_llama(str(root / p), p, seed=i) for i, p in enumerate(sorted(PRESETS))}


@pytest.fixture(scope="session")
def pool():
    """4 gloo processes; each job sets its own TP x PP layout (DP fills the rest)."""
    from megatron_async_rlhf.launch import WorkerGroup

    group = WorkerGroup(4, timeout_s=300)
    yield group
    group.close(force=not group.alive)
