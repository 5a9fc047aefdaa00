"""The pure HF <-> Megatron layout functions, against layouts written out by hand."""

import pytest
import torch

from megatron_async_rlhf.weights import mapping as M


def dims(nh=4, ng=2, d=3, H=5, F=6, V=11, L=2, tied=False):
    return M.LlamaDims(num_layers=L, hidden_size=H, num_heads=nh, num_kv_heads=ng, head_dim=d, ffn_hidden_size=F,
                       vocab_size=V, tie_word_embeddings=tied)


def rows(tag, n_heads, d, H):
    """Head h's rows carry the value tag*100 + h so the order can be read back."""
    return torch.stack([torch.full((d, H), tag * 100.0 + h) for h in range(n_heads)]).reshape(n_heads * d, H)


def test_merge_qkv_is_group_major():
    dm = dims(nh=4, ng=2, d=3)
    q, k, v = rows(1, 4, 3, 5), rows(2, 2, 3, 5), rows(3, 2, 3, 5)
    fused = M.merge_qkv(q, k, v, dm)
    # written out: group 0 = q0 q1 k0 v0, group 1 = q2 q3 k1 v1 (each head 3 rows)
    expect = [100, 101, 200, 300, 102, 103, 201, 301]
    assert fused[::3, 0].tolist() == expect
    assert all(torch.equal(a, b) for a, b in zip(M.split_qkv(fused, dm), (q, k, v)))


def test_qkv_tp_shards_are_whole_groups():
    dm = dims(nh=4, ng=2, d=3)
    fused = M.merge_qkv(rows(1, 4, 3, 5), rows(2, 2, 3, 5), rows(3, 2, 3, 5), dm)
    s1 = M.shard(fused, M.Shard.COLUMN, 1, 2)
    assert s1[::3, 0].tolist() == [102, 103, 201, 301]  # rank 1 holds group 1 only
    assert torch.equal(M.gather([M.shard(fused, M.Shard.COLUMN, r, 2) for r in range(2)], M.Shard.COLUMN), fused)


def test_gate_up_shards_are_gate_r_up_r_and_plain_cat_is_wrong():
    gate = torch.arange(4.0).repeat_interleave(2).reshape(4, 2)  # rows 0,1,2,3
    up = 10 + torch.arange(4.0).repeat_interleave(2).reshape(4, 2)  # rows 10..13
    full = M.merge_gate_up(gate, up)
    shards = [M.shard(full, M.Shard.GATE_UP, r, 2) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 1, 10, 11]
    assert shards[1][:, 0].tolist() == [2, 3, 12, 13]
    assert torch.equal(M.gather(shards, M.Shard.GATE_UP), full)
    assert not torch.equal(torch.cat(shards), full)


def test_row_and_vocab_shards():
    w = torch.arange(12.0).reshape(3, 4)
    parts = [M.shard(w, M.Shard.ROW, r, 2) for r in range(2)]
    assert parts[0].tolist() == [[0, 1], [4, 5], [8, 9]]
    assert torch.equal(M.gather(parts, M.Shard.ROW), w)
    emb = torch.arange(11.0).unsqueeze(1).repeat(1, 2)  # V=11 rows
    padded = M.padded_vocab_size(11, 2, multiple=4)
    assert padded == 12
    vparts = [M.shard(emb, M.Shard.VOCAB, r, 2, padded) for r in range(2)]
    assert [p.shape[0] for p in vparts] == [6, 6] and vparts[1][-1].abs().sum() == 0  # one zero pad row
    assert torch.equal(M.gather(vparts, M.Shard.VOCAB, vocab_size=11), emb)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_padded_vocab_does_not_depend_on_power_of_two_tp(tp):
    assert M.padded_vocab_size(32000, tp) == 32000
    assert M.padded_vocab_size(128256, tp) == 128256
    assert M.padded_vocab_size(777, tp) == 896


def test_stage_table_pp_offsets_and_tied_copy():
    dm = dims(L=4, tied=True)
    last = M.stage_table(dm, pp=2, pp_rank=1, tied_output_in_stage=True)
    names = [b.mcore for b in last]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in names
    hf_of = {b.mcore: b.hf for b in last}
    assert hf_of["decoder.layers.1.mlp.linear_fc2.weight"] == ("model.layers.3.mlp.down_proj.weight",)
    assert hf_of["output_layer.weight"] == ("model.embed_tokens.weight",)
    assert "embedding.word_embeddings.weight" not in names
    first = M.stage_table(dm, pp=2, pp_rank=0)
    assert first[0].mcore == "embedding.word_embeddings.weight" and "decoder.final_layernorm.weight" not in [
        b.mcore for b in first]


def test_every_hf_tensor_is_consumed_exactly_once():
    for tied in (False, True):
        dm = dims(L=4, tied=tied)
        consumed = []
        for r in range(2):
            for b in M.stage_table(dm, pp=2, pp_rank=r):
                consumed += list(b.hf)
        assert sorted(consumed) == sorted(M.expected_hf_shapes(dm))


def test_check_hf_state_dict_names_every_problem():
    dm = dims()
    shapes = M.expected_hf_shapes(dm)
    M.check_hf_state_dict(shapes, dm)  # complete and right: no error
    bad = dict(shapes)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.0.self_attn.q_proj.bias"] = (12,)
    bad["model.layers.0.self_attn.k_proj.weight"] = (7, 5)
    with pytest.raises(ValueError) as e:
        M.check_hf_state_dict(bad, dm)
    msg = str(e.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors" in msg and "model.layers.0.self_attn.q_proj.bias" in msg
    assert "model.layers.0.self_attn.k_proj.weight has shape [7, 5] but the config implies [6, 5]" in msg
