"""Pure tensor losses and advantages. No megatron, no vLLM: ``(logp, ..., mask) -> (loss, metrics)``.

Shapes: ``logp``/``ref_logp``/``sampler_logp`` are per-token ``[N, T]`` log-probs of the completion tokens (0 where
``mask`` is 0); rewards are ``[P, k]`` (P prompts, k samples each) or flat ``[N]`` with N = P*k in prompt-major order.
"""

from megatron_async_rlhf.algorithms.online_dpo import online_dpo_loss, select_pairs
from megatron_async_rlhf.algorithms.ppo import group_advantages, ppo_clip_loss
from megatron_async_rlhf.algorithms.rloo import kl_penalized_rewards, rloo_advantages, rloo_loss

ALGORITHMS = ("online_dpo", "rloo", "ppo")

__all__ = ["ALGORITHMS", "online_dpo_loss", "select_pairs", "group_advantages", "ppo_clip_loss",
           "kl_penalized_rewards", "rloo_advantages", "rloo_loss"]
