"""Gemma-3 in the engine: sliding and global layers, QK-norm, sandwich norms, scaled embedding.

A tiny random Gemma-3 text config (norm weights randomized: HF initializes them to zero,
which would hide a wrong (1 + weight) convention) with a 6-token sliding window.
"""

import pytest
import torch

from quicksilver.decoding import generate
from quicksilver.adapters import arch_spec
from quicksilver.config import Config
from quicksilver.engine import Engine
from quicksilver.flops import dense_forward_flops

transformers = pytest.importorskip("transformers")

SETTINGS = {
    "window": {"kv": {"enabled": True, "recent_window": 4, "sink_tokens": 2}},
    "wide-window": {"kv": {"enabled": True, "recent_window": 9, "sink_tokens": 2}},
    "halt+skipkv": {"halting": {"enabled": True, "threshold": 0.6, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 2},
                    "kv": {"enabled": True, "policy": "skip", "recent_window": 5, "sink_tokens": 1}},
}


def tiny_gemma3(seed: int = 0, window: int = 6):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=256, sliding_window=window, query_pre_attn_scalar=8, attn_implementation="sdpa",
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    model = Gemma3ForCausalLM(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("seq_len", [1, 5, 37])
def test_off_equals_stock_gemma3(seq_len):
    model = tiny_gemma3()
    ids = torch.randint(0, 99, (seq_len,), generator=torch.Generator().manual_seed(seq_len))
    ref = model(ids[None]).logits[0]
    out = Engine(model)(ids)
    assert (out.logits - ref).abs().max().item() <= 1e-5
    # Sliding layers attend to their window only, and the ledger counts exactly that.
    assert out.ledger.total_flops == dense_forward_flops(arch_spec(model.config), seq_len)["total"]


def test_the_sliding_window_and_norms_matter():
    model = tiny_gemma3()
    ids = torch.randint(0, 99, (37,), generator=torch.Generator().manual_seed(0))
    engine = Engine(model)
    ref = engine(ids).logits
    for layer in engine.adapter.layers:
        layer.window = None
    assert (engine(ids).logits - ref).abs().max() > 1e-3  # a global-only model differs: the window is real


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_gemma3_compact_equals_masked_and_generation_equals_recompute(name):
    model = tiny_gemma3(seed=1)
    engine = Engine(model, Config.from_dict(SETTINGS[name]))
    ids = torch.randint(0, 99, (33,), generator=torch.Generator().manual_seed(2))
    compact, masked = engine(ids), engine(ids, compact=False)
    assert torch.allclose(compact.logits, masked.logits, atol=1e-5)
    assert compact.ledger.as_dict() == masked.ledger.as_dict()
    result = generate(engine, ids[:20], max_new_tokens=8)
    seq = torch.cat([ids[:20], torch.tensor(result.tokens[0])])
    assert engine(seq).logits[19:-1].argmax(-1).tolist() == result.tokens[0]


def test_off_generation_equals_hf_generate():
    model = tiny_gemma3(seed=3)
    ids = torch.randint(0, 99, (10,), generator=torch.Generator().manual_seed(3))
    ours = generate(Engine(model), ids, max_new_tokens=12).tokens[0]
    theirs = model.generate(ids[None], max_new_tokens=12, do_sample=False)[0, 10:].tolist()
    assert ours == theirs
