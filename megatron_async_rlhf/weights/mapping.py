"""HF LLaMA <-> Megatron-core GPTModel: the one name/layout table and the pure merge/split/shard functions.

Used by the converter (tools/convert_checkpoint.py), by loading HF weights into a sharded learner, and by the live
weight sync to the rollout engines. Imports only torch: no megatron, no vLLM.

Layouts (ARCHITECTURE.md, "The layouts that bite"):
- fused QKV `linear_qkv.weight` is ``[ng * (hpg + 2) * d, H]`` ordered group by group: the group's ``hpg`` query
  heads, its k head, its v head. TP rank r holds groups ``[r*ng/tp, (r+1)*ng/tp)``, so TP shards are plain dim-0
  chunks of the fused tensor.
- gated MLP `linear_fc1.weight` is ``[gate; up]`` in full, but each TP shard is ``[gate_r; up_r]``.
- row-parallel (`linear_proj`, `linear_fc2`) shard on dim 1; embedding/output on dim 0 after vocab padding.
- Megatron's non-interleaved RoPE equals HF's rotate_half: no Q/K permutation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Iterator

import torch


class Shard(str, Enum):
    """How a Megatron parameter is split over tensor-parallel ranks."""

    REPLICATED = "replicated"  # norms: every TP rank holds the full tensor
    COLUMN = "column"  # dim 0 chunks (fused QKV: its group-major layout makes this exact)
    ROW = "row"  # dim 1 chunks (linear_proj, linear_fc2)
    VOCAB = "vocab"  # dim 0 chunks of the vocab-padded tensor (embedding, output layer)
    GATE_UP = "gate_up"  # each shard is [gate_r; up_r]


@dataclass(frozen=True)
class LlamaDims:
    """The shape facts of a LLaMA-like model that the layouts depend on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Entry:
    """One Megatron tensor and the HF tensors it is made of (more than one when fused)."""

    mcore: str  # name relative to the GPTModel, with {i} for the layer index
    hf: tuple[str, ...]  # HF names, with {i}
    shard: Shard
    fuse: str | None = None  # "qkv" | "gate_up" | None


def layer_entries(fused_norms: bool) -> tuple[Entry, ...]:
    """Per-layer entries. ``fused_norms``: Transformer Engine spec fuses the pre-attention/pre-MLP RMSNorm weights into
    linear_qkv / linear_fc1 (``layer_norm_weight``); the local spec keeps them as separate modules."""
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"
    p = "decoder.layers.{i}."
    h = "model.layers.{i}."
    return (
        Entry(p + attn_norm, (h + "input_layernorm.weight",), Shard.REPLICATED),
        Entry(
            p + "self_attention.linear_qkv.weight",
            (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight", h + "self_attn.v_proj.weight"),
            Shard.COLUMN,
            fuse="qkv",
        ),
        Entry(p + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), Shard.ROW),
        Entry(p + mlp_norm, (h + "post_attention_layernorm.weight",), Shard.REPLICATED),
        Entry(
            p + "mlp.linear_fc1.weight",
            (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
            Shard.GATE_UP,
            fuse="gate_up",
        ),
        Entry(p + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), Shard.ROW),
    )


EMBEDDING = Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Shard.VOCAB)
FINAL_NORM = Entry("decoder.final_layernorm.weight", ("model.norm.weight",), Shard.REPLICATED)
OUTPUT = Entry("output_layer.weight", ("lm_head.weight",), Shard.VOCAB)
# A scalar head (reward model, critic): HF LlamaForSequenceClassification's ``score`` [1, H], held whole on every TP
# rank of the last stage where an LM holds its output layer (learner/value_head.py).
SCORE = Entry("output_layer.weight", ("score.weight",), Shard.REPLICATED)


def head_kind(hf_config: dict) -> str:
    """``score`` for an HF sequence classifier (``architectures`` ``*ForSequenceClassification``), else ``lm``."""
    archs = hf_config.get("architectures") or []
    return "score" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"


# ---------------------------------------------------------------------------------------------------------------------
# Vocab padding
# ---------------------------------------------------------------------------------------------------------------------


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Round the vocab up to a multiple of lcm(multiple, tp). For every power-of-two TP up to ``multiple`` the result
    does not depend on TP, so a checkpoint saved at one TP loads at another."""
    m = multiple * tp // math.gcd(multiple, tp)
    return int(math.ceil(vocab_size / m) * m)


def pad_vocab(w: torch.Tensor, padded: int) -> torch.Tensor:
    """Zero rows appended to ``[V, H]``. Log-prob code masks the padded columns, so their values never matter."""
    if w.shape[0] == padded:
        return w
    if w.shape[0] > padded:
        raise ValueError(f"cannot pad a vocab of {w.shape[0]} rows down to {padded}")
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])], dim=0)


def unpad_vocab(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return w[:vocab_size]


# ---------------------------------------------------------------------------------------------------------------------
# Fusing
# ---------------------------------------------------------------------------------------------------------------------


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: LlamaDims) -> torch.Tensor:
    """HF q ``[nh*d, H]``, k/v ``[ng*d, H]`` -> Megatron fused ``[ng*(hpg+2)*d, H]`` in group-major order."""
    ng, hpg, d = dims.num_kv_heads, dims.heads_per_group, dims.head_dim
    hidden = q.shape[-1]
    q = q.reshape(ng, hpg * d, hidden)  # [ng, hpg*d, H]
    k = k.reshape(ng, d, hidden)  # [ng, d, H]
    v = v.reshape(ng, d, hidden)  # [ng, d, H]
    return torch.cat([q, k, v], dim=1).reshape(ng * (hpg + 2) * d, hidden)  # [ng*(hpg+2)*d, H]


def split_qkv(qkv: torch.Tensor, dims: LlamaDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv` for a full (TP-gathered) fused tensor."""
    ng, hpg, d = dims.num_kv_heads, dims.heads_per_group, dims.head_dim
    hidden = qkv.shape[-1]
    g = qkv.reshape(ng, (hpg + 2) * d, hidden)  # [ng, (hpg+2)*d, H]
    q, k, v = torch.split(g, [hpg * d, d, d], dim=1)
    return (
        q.reshape(ng * hpg * d, hidden).contiguous(),  # [nh*d, H]
        k.reshape(ng * d, hidden).contiguous(),  # [ng*d, H]
        v.reshape(ng * d, hidden).contiguous(),  # [ng*d, H]
    )


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)  # [2*F, H]


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def fuse(entry: Entry, hf_tensors: list[torch.Tensor], dims: LlamaDims) -> torch.Tensor:
    """The full (unsharded, unpadded) Megatron tensor of ``entry`` from its HF tensors, in ``entry.hf`` order."""
    if entry.fuse == "qkv":
        return merge_qkv(*hf_tensors, dims)
    if entry.fuse == "gate_up":
        return merge_gate_up(*hf_tensors)
    (t,) = hf_tensors
    return t


def unfuse(entry: Entry, full: torch.Tensor, dims: LlamaDims) -> list[torch.Tensor]:
    """Inverse of :func:`fuse`: HF tensors in ``entry.hf`` order."""
    if entry.fuse == "qkv":
        return list(split_qkv(full, dims))
    if entry.fuse == "gate_up":
        return list(split_gate_up(full))
    return [full]


# ---------------------------------------------------------------------------------------------------------------------
# Tensor parallel shard / gather
# ---------------------------------------------------------------------------------------------------------------------


def shard(full: torch.Tensor, kind: Shard, tp_rank: int, tp: int, padded_vocab: int | None = None) -> torch.Tensor:
    """The TP rank's piece of a full Megatron tensor (vocab tensors are padded to ``padded_vocab`` first)."""
    if kind is Shard.REPLICATED:
        return full
    if kind is Shard.VOCAB:
        assert padded_vocab is not None, "vocab tensors need padded_vocab"
        return torch.chunk(pad_vocab(full, padded_vocab), tp, dim=0)[tp_rank].contiguous()
    if kind is Shard.COLUMN:
        return torch.chunk(full, tp, dim=0)[tp_rank].contiguous()
    if kind is Shard.ROW:
        return torch.chunk(full, tp, dim=1)[tp_rank].contiguous()
    if kind is Shard.GATE_UP:
        gate, up = split_gate_up(full)
        return torch.cat([torch.chunk(gate, tp, 0)[tp_rank], torch.chunk(up, tp, 0)[tp_rank]], dim=0)  # [2*F/tp, H]
    raise ValueError(kind)


def gather(shards: list[torch.Tensor], kind: Shard, vocab_size: int | None = None) -> torch.Tensor:
    """Full Megatron tensor from the TP shards in rank order (vocab padding stripped to ``vocab_size``). One shard is
    the full tensor already: no copy."""
    if kind is Shard.REPLICATED:
        return shards[0]
    if kind is Shard.VOCAB:
        assert vocab_size is not None, "vocab tensors need vocab_size"
        return unpad_vocab(shards[0] if len(shards) == 1 else torch.cat(shards, dim=0), vocab_size)
    if len(shards) == 1:
        return shards[0]
    if kind is Shard.COLUMN:
        return torch.cat(shards, dim=0)
    if kind is Shard.ROW:
        return torch.cat(shards, dim=1)
    if kind is Shard.GATE_UP:
        # a plain cat would interleave [gate_0; up_0; gate_1; up_1]: chunk each shard, then all gates, then all ups
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)  # [2*F, H]
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline stages and the per-model table
# ---------------------------------------------------------------------------------------------------------------------


def layer_offset(num_layers: int, pp: int, pp_rank: int) -> int:
    """Global index of a stage's first layer (layers are split evenly; config validation enforces divisibility)."""
    return pp_rank * (num_layers // pp)


@dataclass(frozen=True)
class Bound:
    """An entry bound to a layer: concrete Megatron name (local to its stage) and concrete HF names."""

    entry: Entry
    mcore: str
    hf: tuple[str, ...]


def stage_table(
    dims: LlamaDims, pp: int = 1, pp_rank: int = 0, fused_norms: bool = False, tied_output_in_stage: bool = False,
    head: str = "lm",
) -> list[Bound]:
    """Every Megatron tensor that a pipeline stage owns, with its HF sources.

    ``tied_output_in_stage``: with tied embeddings and PP>1 the last stage keeps its own copy of the embedding as
    ``output_layer.weight``; it is filled from ``model.embed_tokens.weight`` but never exported twice.
    ``head``: ``lm`` (output layer = ``lm_head``) or ``score`` (a scalar head = ``score``; never tied).
    """
    per_stage = dims.num_layers // pp
    offset = layer_offset(dims.num_layers, pp, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp - 1
    out: list[Bound] = []
    if first:
        out.append(Bound(EMBEDDING, EMBEDDING.mcore, EMBEDDING.hf))
    for local in range(per_stage):
        g = offset + local
        for e in layer_entries(fused_norms):
            out.append(Bound(e, e.mcore.format(i=local), tuple(n.format(i=g) for n in e.hf)))
    if last:
        out.append(Bound(FINAL_NORM, FINAL_NORM.mcore, FINAL_NORM.hf))
        if head == "score":
            out.append(Bound(SCORE, SCORE.mcore, SCORE.hf))
        elif not dims.tie_word_embeddings:
            out.append(Bound(OUTPUT, OUTPUT.mcore, OUTPUT.hf))
        elif tied_output_in_stage:
            out.append(Bound(OUTPUT, OUTPUT.mcore, EMBEDDING.hf))
    return out


def expected_hf_shapes(dims: LlamaDims, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this model must hold, with its shape (``head``: see :func:`stage_table`)."""
    H, d, F, V = dims.hidden_size, dims.head_dim, dims.ffn_hidden_size, dims.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if head == "score":
        shapes["score.weight"] = (1, H)
    elif not dims.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(dims.num_layers):
        h = f"model.layers.{i}."
        shapes.update(
            {
                h + "input_layernorm.weight": (H,),
                h + "post_attention_layernorm.weight": (H,),
                h + "self_attn.q_proj.weight": (dims.num_heads * d, H),
                h + "self_attn.k_proj.weight": (dims.num_kv_heads * d, H),
                h + "self_attn.v_proj.weight": (dims.num_kv_heads * d, H),
                h + "self_attn.o_proj.weight": (H, dims.num_heads * d),
                h + "mlp.gate_proj.weight": (F, H),
                h + "mlp.up_proj.weight": (F, H),
                h + "mlp.down_proj.weight": (H, F),
            }
        )
    return shapes


# HF buffers that are derived, never learned; harmless if a checkpoint carries them.
_IGNORABLE_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def check_hf_state_dict(names_and_shapes: dict[str, tuple[int, ...]], dims: LlamaDims, head: str = "lm") -> None:
    """Every expected HF tensor present with the right shape, nothing unexpected; one error listing all problems."""
    expected = expected_hf_shapes(dims, head)
    have = {k: tuple(v) for k, v in names_and_shapes.items() if not _IGNORABLE_HF.match(k)}
    if head == "lm" and dims.tie_word_embeddings and "lm_head.weight" in have:
        # some tied checkpoints store the copy anyway; accept it only if it has the embedding's shape
        expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
    problems = []
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not part of a LLaMA model with this config): {_short(unexpected)}")
    for k in sorted(set(expected) & set(have)):
        if expected[k] != have[k]:
            problems.append(f"tensor {k} has shape {list(have[k])} but the config implies {list(expected[k])}")
    if problems:
        raise ValueError(
            "HF checkpoint does not match its config.json:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: point --hf at a directory whose config.json and *.safetensors belong to the same LLaMA model."
        )


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def hf_from_full_mcore(bound: Iterable[Bound], full: dict[str, torch.Tensor], dims: LlamaDims) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors from full (TP-gathered, vocab-unpadded) Megatron tensors keyed by the bound Megatron name."""
    for b in bound:
        if b.entry is OUTPUT and dims.tie_word_embeddings:
            continue  # the tied copy is the embedding, exported once
        yield from zip(b.hf, unfuse(b.entry, full[b.mcore], dims))
