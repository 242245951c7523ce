"""The analytic FLOP formula against torch.utils.flop_counter, where that counter is exact.

With eager attention HF multiplies Q.K^T and P.V over all T x T pairs before masking, so
the counter sees the non-causal count; our ledger counts causal pairs, tested separately.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY
from quicksilver.adapters import arch_spec
from quicksilver.flops import causal_pairs, dense_forward_flops


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_dense_formula_matches_torch_flop_counter(family, seq_len):
    model = TINY[family](attn="eager")
    ids = torch.randint(0, 99, (1, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    ours = dense_forward_flops(arch_spec(model.config), seq_len, causal=False)
    assert ours["total"] == counter.get_total_flops()


def test_head_rows_are_counted_as_computed():
    model = TINY["llama"](attn="eager")
    ids = torch.randint(0, 99, (1, 12))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, logits_to_keep=3)
    assert dense_forward_flops(arch_spec(model.config), 12, head_rows=3, causal=False)["total"] == counter.get_total_flops()


def test_causal_pairs():
    assert causal_pairs(4) == 1 + 2 + 3 + 4
    assert causal_pairs(6, window=2) == 1 + 2 * 5
    assert causal_pairs(5, window=10) == causal_pairs(5)
    spec = arch_spec(TINY["gpt2"]().config)
    full, causal = dense_forward_flops(spec, 10, causal=False), dense_forward_flops(spec, 10)
    assert full["total"] - causal["total"] == 4 * spec.n_heads * spec.head_dim * spec.n_layers * (100 - 55)
