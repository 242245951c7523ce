"""The weights' one home (``quicksilver.arena``): values and outputs unchanged, one mapping, fused views kept."""

from __future__ import annotations

import torch
from conftest import tiny_llama

from quicksilver import Config, Engine, arena


def _storages(model) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_rehome_moves_every_weight_into_one_mapping_without_changing_a_value_or_an_output():
    model = tiny_llama(tie_word_embeddings=True)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 99, (2, 9))
    logits = model(ids).logits
    moved = arena.rehome(model.parameters())
    assert moved >= sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(_storages(model)) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one parameter moved once
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
    assert arena.rehome([]) == 0


def test_rehomed_weights_still_fuse_as_views_and_the_engine_computes_what_it_did_before():
    model = tiny_llama()
    ids = torch.randint(0, 99, (11,))
    expected = Engine(tiny_llama(), Config.preset("off"))(ids).logits  # the same weights (same seed), not moved
    arena.rehome(model.parameters())
    engine = Engine(model, Config.preset("off"))
    p = engine.adapter.layers[0]
    assert p.qkv is not None and p.gate_up is not None
    # q, k and v lay back to back in the mapping, so their fused weight is a view of it, not a new buffer
    assert p.qkv.weight.untyped_storage().data_ptr() == model.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()
    assert len(_storages(model)) == 1
    torch.testing.assert_close(engine(ids).logits, expected, rtol=0, atol=0)


def test_it_can_be_turned_off(monkeypatch):
    model = tiny_llama()
    n = len(_storages(model))
    monkeypatch.setenv("QUICKSILVER_ARENA", "0")
    assert arena.rehome(model.parameters()) == 0
    assert len(_storages(model)) == n > 1
