"""Group-wise asymmetric 4-bit weights (quant_q4): bit-exact against a plain per-group reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quicksilver.quant_q4 import Q4Weight, dequantize_q4, pack_nibbles, quantize_q4, unpack_nibbles


def reference_quantize(w: torch.Tensor, group: int):
    """Q4_1's rule, one group at a time in numpy float32: m = min, d = (max - m) / 15 (float16 each),
    q = round-half-even((x - m) / d) clamped to 0..15, or 0 where d == 0."""
    a = w.numpy().astype(np.float32)
    out_f, in_f = a.shape
    q = np.zeros((out_f, in_f), np.uint8)
    d = np.zeros((out_f, in_f // group), np.float16)
    m = np.zeros((out_f, in_f // group), np.float16)
    for o in range(out_f):
        for g in range(in_f // group):
            x = a[o, g * group : (g + 1) * group]
            m[o, g] = np.float16(x.min())
            d[o, g] = np.float16((x.max() - np.float32(m[o, g])) / np.float32(15))
            if np.float32(d[o, g]) > 0:
                q[o, g * group : (g + 1) * group] = np.clip(np.round((x - np.float32(m[o, g])) / np.float32(d[o, g])), 0, 15)
    return q, d, m


def reference_dequantize(q: np.ndarray, d: np.ndarray, m: np.ndarray, group: int) -> np.ndarray:
    """GGUF's Q4_1 dequantization in float32: d * q + m."""
    rep = lambda t: np.repeat(t.astype(np.float32), group, axis=1)  # noqa: E731
    return rep(d) * q.astype(np.float32) + rep(m)


@pytest.mark.parametrize("group", [32, 64])
def test_quantize_and_dequantize_equal_the_reference_bit_for_bit(group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 256, generator=g) * torch.rand(12, 1, generator=g)
    w[3, :group] = 0.25  # a constant group: d = 0, every code 0
    qw = quantize_q4(w, group)
    q, d, m = reference_quantize(w, group)
    assert torch.equal(unpack_nibbles(qw.codes), torch.from_numpy(q))
    assert torch.equal(qw.scales, torch.from_numpy(d)) and torch.equal(qw.mins, torch.from_numpy(m))
    assert torch.equal(dequantize_q4(qw), torch.from_numpy(reference_dequantize(q, d, m, group)))
    assert float(dequantize_q4(qw)[3, :group].sub(0.25).abs().max()) == 0


def test_a_weight_on_a_q4_1_grid_comes_back_exactly():
    """What a model de-quantized from a Q4_1 GGUF holds: d * q + m with float16 d and m, each group
    using codes 0 and 15 (Q4_1 maps its minimum to 0 and its maximum to 15)."""
    g = torch.Generator().manual_seed(1)
    out_f, in_f = 16, 128
    d = (torch.rand(out_f, in_f // 32, generator=g) * 0.01 + 1e-4).half()
    m = (-torch.rand(out_f, in_f // 32, generator=g) * 0.08).half()
    q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    q[:, 0::32], q[:, 1::32] = 0, 15
    grid = Q4Weight(pack_nibbles(q), d, m)
    w = dequantize_q4(grid)
    back = quantize_q4(w)
    assert torch.equal(back.codes, grid.codes) and torch.equal(back.scales, d) and torch.equal(back.mins, m)
    assert torch.equal(dequantize_q4(back), w)


def test_the_error_is_at_most_half_a_step():
    """Half a step, plus what rounding m and d to float16 moves the grid (2^-11 relative each)."""
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(2))
    qw = quantize_q4(w)
    step = qw.scales.float().repeat_interleave(32, dim=1)
    m = qw.mins.float().repeat_interleave(32, dim=1)
    bound = step / 2 + (m.abs() + 15 * step) * 2**-11 + 1e-6
    assert bool(((dequantize_q4(qw) - w).abs() <= bound).all())


def test_the_nibble_layout_is_q4_1s():
    q = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    q[0, 32:] = 15 - q[0, 32:]
    packed = pack_nibbles(q)
    assert packed.shape == (1, 32) and packed.dtype == torch.uint8
    for blk in range(2):
        for j in range(16):  # byte j of a block: weight j in the low nibble, weight j + 16 in the high one
            byte = int(packed[0, 16 * blk + j])
            assert byte & 15 == int(q[0, 32 * blk + j]) and byte >> 4 == int(q[0, 32 * blk + j + 16])
    assert torch.equal(unpack_nibbles(packed), q)


def test_bytes_per_weight():
    assert quantize_q4(torch.randn(4, 64)).bytes_per_weight == 0.625  # Q4_1: 20 bytes per 32 weights
    assert quantize_q4(torch.randn(4, 128), 64).bytes_per_weight == 0.5625


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4(torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_q4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_q4(torch.tensor([[float("nan")] * 32]))
    with pytest.raises(ValueError, match="float16"):
        quantize_q4(torch.full((1, 32), 1e6).index_fill_(1, torch.tensor([0]), -1e6))
    with pytest.raises(ValueError, match="2-D"):
        quantize_q4(torch.randn(64))
