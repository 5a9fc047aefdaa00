"""A tiny random-weight LLaMA whose completions have long-tailed, roughly geometric lengths: every sampled token is
EOS with about the same probability ``p_eos`` whatever the context (``tools/bench_async.py --shape longtail``).

Construction (LLaMA has no biases, so the EOS logit is made constant through a residual coordinate that never
changes). Starting from :func:`models.tiny.make_tiny_llama`:

* coordinate 0 of every token embedding is set to ``anchor`` and row 0 of every ``o_proj`` and ``down_proj`` is zeroed,
  so no layer writes coordinate 0: the residual stream enters the final RMSNorm with ``x[0] = anchor`` exactly;
* the residual's other coordinates have a norm that varies little between contexts (a 127-dim vector), so after the
  final norm ``h[0] = w0 * anchor / rms(x)`` is nearly the same at every position (about 2% relative spread with the
  default anchor, measured on random contexts);
* ``lm_head``'s EOS row becomes ``(c, 0, ..., 0)`` (EOS logit ``c * h[0]``) and column 0 of every other row is zeroed
  (the other logits do not see the constant). ``c`` is set by bisection so that the mean of ``p(EOS)`` over the
  positions of random token contexts at temperature 1 equals ``p_eos``.

The other tokens keep their random, context-dependent logits, so a completion is random text that stops at each token
with probability about ``p_eos``: lengths about geometric with mean ``1 / p_eos``, cut at ``max_new_tokens``. The
achieved mean and spread of ``p(EOS)`` are written to ``longtail.json`` next to the weights.
"""

from __future__ import annotations

import json
import os


def make_longtail_llama(out_dir: str, p_eos: float = 0.01, seed: int = 0, anchor: float = 8.0,
                        preset: str = "tiny-gqa") -> str:
    """Write the model (+ tokenizer) to ``out_dir`` (kept if it was made with the same arguments); returns
    ``out_dir``."""
    import torch
    from transformers import LlamaForCausalLM

    from megatron_async_rlhf.models.tiny import SPECIAL_TOKENS, make_tiny_llama

    if not 0.0 < p_eos < 1.0:
        raise ValueError(f"p_eos={p_eos} must be in (0, 1)")
    spec = {"p_eos": p_eos, "seed": seed, "anchor": anchor, "preset": preset}
    info_path = os.path.join(out_dir, "longtail.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            if json.load(f).get("spec") == spec:
                return out_dir
    make_tiny_llama(out_dir, preset, seed)
    model = LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    model.config.max_position_embeddings = 1024  # room for completions of several hundred tokens
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = anchor
        for layer in model.model.layers:  # nothing writes residual coordinate 0
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        head = model.lm_head.weight
        head[:, 0] = 0.0
        head[eos, :] = 0.0
        gen = torch.Generator().manual_seed(seed + 1)
        ids = torch.randint(len(SPECIAL_TOKENS), model.config.vocab_size, (32, 64), generator=gen)
        h = model.model(ids).last_hidden_state.flatten(0, 1)  # [positions, hidden]
        others = model.lm_head(h)  # EOS logit 0 here
        others[:, eos] = float("-inf")
        lse = torch.logsumexp(others, dim=-1)

        def p_of(c: float) -> torch.Tensor:  # p(EOS) per position with EOS logit c * h[0]
            return torch.sigmoid(c * h[:, 0] - lse)

        lo, hi = -100.0, 100.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if p_of(mid).mean() < p_eos else (lo, mid)
        c = (lo + hi) / 2
        head[eos, 0] = c
        p = p_of(c)
    model.save_pretrained(out_dir, safe_serialization=True)
    q = torch.quantile(p, torch.tensor([0.1, 0.5, 0.9]))
    with open(info_path, "w") as f:
        json.dump({"spec": spec, "eos_logit_scale": c, "p_eos_mean": p.mean().item(),
                   "p_eos_p10_p50_p90": [round(x, 5) for x in q.tolist()]}, f)
    return out_dir

