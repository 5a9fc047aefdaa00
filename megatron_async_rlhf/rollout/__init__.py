"""The rollout pool: engines that sample with the learner's weights, synced every step. ``base.py`` is the backend
interface and registry (``rollout.backend``); ``engine.py`` the vLLM backend (helpers ``worker_ext.py``,
``transfer_backend.py``: the weight path on vLLM's weight-transfer API, ``weight_stream.py``, ``reaper.py``);
``hf.py`` a plain transformers one; ``server.py`` / ``client.py`` the two ends of the protocol; ``supervisor.py``
restarts an engine that dies or hangs (``faults.py``: fault injection for drills and tests)."""

from megatron_async_rlhf.rollout import engine, hf  # noqa: F401,E402  (each registers its backend; heavy imports wait)
