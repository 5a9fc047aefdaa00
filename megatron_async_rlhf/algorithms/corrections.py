"""Off-policy corrections: how much a token's policy-gradient loss counts, given that the sampler (the rollout
engine, possibly older weights, another numeric stack) drew it and the learner trains on it.

Per completion token, ``r = pi_old / pi_sampler`` (``pi_old``: the learner's probability when the batch arrived, the
*proximal* policy; ``pi_sampler``: the engine's, the *behaviour* policy). The PPO ratio ``pi / pi_old`` is clipped
separately (``algorithms/ppo.py``); the correction is a detached weight ``w`` on each token's clipped term:

* ``tis``: ``w = min(r, cap)``, truncated importance sampling. This is also decoupled PPO (Hilton et al. 2022; AReaL):
  behaviour policy = the sampler, proximal policy = the learner at the start of the step.
* ``mis``: ``w = r`` inside ``[low, high]``, 0 outside: masked importance sampling (ICEPOP): tokens on which learner
  and sampler disagree too much are dropped rather than capped.
* ``seq_mask``: ``tis``, and every token of a sequence whose geometric-mean ``r`` (``exp`` of the mean log-ratio over
  its tokens) is outside ``[low, high]`` gets 0: a sequence-level mask.
* ``none``: ``w = 1`` (on-policy PPO: no correction).

The returned statistics make the mismatch visible per step: ``sampler_logp_diff`` (mean ``|log pi_old - log
pi_sampler|``), ``sampler_ratio_max``, ``masked_fraction`` (tokens with weight 0), ``capped_fraction`` (tokens
whose weight was capped) and ``is_weight_sq_mean`` (the mean of ``w^2``), from which :func:`effective_sample_size`
makes ``ess``, the weights' effective sample size over the batch's tokens, ``(sum w)^2 / (n sum w^2) = mean(w)^2 /
mean(w^2)``, in (0, 1]: 1 when every weight is equal. All are token means (or a maximum) so they add up exactly over
micro-batches and data-parallel replicas.
"""

from __future__ import annotations

import torch

CORRECTIONS = ("tis", "mis", "seq_mask", "none")


def importance_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, kind: str = "tis",
                       cap: float = 2.0, low: float = 0.5, high: float = 2.0) -> tuple[torch.Tensor, dict]:
    """(``w [N, T]``, detached, 0 outside ``mask``; statistics over the mask's tokens)."""
    if kind not in CORRECTIONS:
        raise ValueError(f"off-policy correction {kind!r}: use one of {list(CORRECTIONS)}")
    log_r = (old_logp - sampler_logp).detach() * mask
    r = torch.exp(log_r)
    m = mask.bool()
    if kind == "none":
        w = torch.ones_like(r)
    elif kind == "mis":
        w = torch.where((r >= low) & (r <= high), r, torch.zeros_like(r))
    else:
        w = r.clamp(max=cap)
        if kind == "seq_mask":
            geo = torch.exp(log_r.sum(-1) / mask.sum(-1).clamp(min=1))  # [N]
            w = w * ((geo >= low) & (geo <= high)).to(w.dtype).unsqueeze(-1)
    w = (w * mask).detach()
    zero = r.new_zeros(())
    if not m.any():
        return w, {"sampler_logp_diff": zero, "sampler_ratio_max": zero, "masked_fraction": zero,
                   "capped_fraction": zero, "is_weight_mean": zero, "is_weight_sq_mean": zero}
    wm = w[m]
    stats = {
        "sampler_logp_diff": log_r[m].abs().mean(),
        "sampler_ratio_max": r[m].max(),
        "masked_fraction": (wm == 0).float().mean(),
        "capped_fraction": ((r > cap) & m)[m].float().mean() if kind in ("tis", "seq_mask") else zero,
        "is_weight_mean": wm.mean(),
        "is_weight_sq_mean": (wm ** 2).mean(),
    }
    return w, stats


def effective_sample_size(metrics: dict) -> dict:
    """``metrics`` with ``ess = is_weight_mean^2 / is_weight_sq_mean`` added (the batch's, from its means)."""
    if "is_weight_sq_mean" not in metrics:
        return metrics
    sq = metrics["is_weight_sq_mean"]
    return {**metrics, "ess": metrics["is_weight_mean"] ** 2 / sq if sq > 0 else 0.0}
