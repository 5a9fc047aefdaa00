"""RL algorithms, one module each, registered by name (``base.py``: the interface ``learner/step.py`` calls), and
their pure tensor maths. No megatron, no vLLM: ``(logp, ..., mask) -> (loss, metrics)``.

Shapes: ``logp``/``ref_logp``/``sampler_logp`` are per-token ``[N, T]`` log-probs of the completion tokens (0 where
``mask`` is 0); rewards are ``[P, k]`` (P prompts, k samples each) or flat ``[N]`` with N = P*k in prompt-major order.

A new algorithm is one new module here (a registered :class:`Algorithm` subclass with its ``Config``), imported below.
"""

from megatron_async_rlhf.algorithms import grpo, online_dpo, ppo, ppo_critic, rloo  # noqa: F401  (registers them)
from megatron_async_rlhf.algorithms.base import ALGORITHMS, Algorithm, build_algorithm, register_algorithm
from megatron_async_rlhf.algorithms.online_dpo import online_dpo_loss, select_pairs
from megatron_async_rlhf.algorithms.ppo import group_advantages, ppo_clip_loss
from megatron_async_rlhf.algorithms.rloo import kl_penalized_rewards, rloo_advantages, rloo_loss

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm", "register_algorithm", "online_dpo_loss", "select_pairs",
           "group_advantages", "ppo_clip_loss", "kl_penalized_rewards", "rloo_advantages", "rloo_loss"]
