"""The rollout pool: engines that sample with the learner's weights, synced every step. ``base.py`` is the backend
interface and registry (``rollout.backend``); ``engine.py`` the vLLM backend (helpers ``worker_ext.py``,
``weight_stream.py``); ``hf.py`` a plain transformers one; ``server.py`` / ``client.py`` the two ends of the protocol."""

from megatron_async_rlhf.rollout import engine, hf  # noqa: F401,E402  (each registers its backend; heavy imports wait)
