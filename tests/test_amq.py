"""Adaptive Matryoshka Quantization: primitives bit-exact, kernels above an SNR floor, the rule, the engine."""

import warnings

import numpy as np
import pytest
import torch

from conftest import TINY
from quicksilver.config import Config
from quicksilver.engine import Engine
from quicksilver.errors import QuicksilverError
from quicksilver.mechanisms import AdaptiveMatryoshkaQuantization
from quicksilver.linears import Int8Kernel, QuantizedLinear
from quicksilver.quant import dequantize, quantize_int8, slice_codes, snr_db


def reference_slice(q: np.ndarray, r: int) -> np.ndarray:
    """The top r bits of each int8 code, at the bucket's midpoint, written out element by element."""
    step = 2 ** (8 - r)
    out = np.empty_like(q, dtype=np.int64)
    for i, x in np.ndenumerate(q):
        top = int(np.floor(x / step))  # the r-bit two's-complement prefix of x
        out[i] = top * step + step // 2
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_slices_equal_the_reference_operator_bit_for_bit(bits):
    codes = torch.arange(-127, 128, dtype=torch.int8).reshape(1, -1)  # every code, ties included
    ours = slice_codes(codes, bits).numpy().astype(np.int64)
    assert np.array_equal(ours, reference_slice(codes.numpy().astype(np.int64), bits))
    assert len(np.unique(ours)) <= 2**bits
    if bits == 4:  # exactly the high nibble: a kernel reading the high plane alone computes the int4 slice
        assert np.array_equal((ours - 8) // 16, codes.numpy().astype(np.int64) >> 4)


def test_quantize_is_symmetric_int8_per_channel_and_per_group():
    w = torch.randn(6, 64)
    qc, qg = quantize_int8(w), quantize_int8(w, 16)
    assert qc.codes.dtype == torch.int8 and qc.codes.abs().max() <= 127
    assert qc.scales.shape == (6, 1) and qg.scales.shape == (6, 4)
    assert torch.allclose(qc.scales[:, 0], w.abs().amax(1) / 127)
    assert (dequantize(qc) - w).abs().max() <= qc.scales.max() / 2 + 1e-7


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_output_above_snr_floor_and_lower_slices_degrade_in_order(group_size):
    torch.manual_seed(0)
    w, x = torch.randn(256, 128) * 0.05, torch.randn(32, 128)
    ref = x @ w.T
    qw = quantize_int8(w, group_size)
    snr = {b: snr_db(ref, x @ dequantize(qw, b).T) for b in (8, 4, 2)}
    assert snr[8] > 35  # dB
    assert snr[8] > snr[4] > snr[2]


def test_real_int8_kernel_matches_dequantized_int8_above_snr_floor():
    torch.manual_seed(1)
    w, b, x = torch.randn(96, 64) * 0.05, torch.randn(96) * 0.01, torch.randn(10, 64)
    qw = quantize_int8(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's quantized tensors are deprecated
        out = Int8Kernel(qw, b)(x)
    assert snr_db(x @ w.T + b, out) > 30
    with pytest.raises(ValueError, match="per-channel"):
        Int8Kernel(quantize_int8(w, 32), b)


def test_rows_are_grouped_by_bit_width():
    torch.manual_seed(2)
    w, x = torch.randn(48, 32), torch.randn(7, 32)
    lin = QuantizedLinear(w, None, 16)
    bits = torch.tensor([8, 4, 2, 8, 4, 4, 2])
    out = lin(x, bits)
    for i, b in enumerate(bits.tolist()):
        assert torch.allclose(out[i], x[i] @ dequantize(lin.qw, b).T, atol=1e-5)


def test_bit_rule_and_protected_positions():
    amq = AdaptiveMatryoshkaQuantization(enabled=True, int4_below=0.3, int2_below=0.1, protect_first=2)
    drift = torch.tensor([0.05, 0.05, 0.05, 0.2, 0.5])
    assert amq.bits_for(drift, torch.arange(5)).tolist() == [8, 8, 2, 4, 8]


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"uniform_bits": 3}, "uniform_bits"),
        ({"int4_below": -0.1}, "int4_below"),
        ({"int4_below": 0.1, "int2_below": 0.2}, "must not exceed"),
        ({"group_size": 0}, "group_size"),
    ],
)
def test_bad_amq_settings_are_rejected(settings, message):
    with pytest.raises(QuicksilverError, match=message):
        Config.from_dict({"amq": settings})


def test_settings_that_do_not_fit_the_model():
    model = TINY["llama"]()
    with pytest.raises(QuicksilverError, match="decision_layer"):
        Engine(model, Config.from_dict({"amq": {"enabled": True, "decision_layer": 4, "int4_below": 0.2}}))
    with pytest.raises(QuicksilverError, match="group_size"):
        Engine(model, Config.from_dict({"amq": {"enabled": True, "group_size": 24}}))


AMQ_CONFIGS = {
    "int8-kernel": {"amq": {"enabled": True, "uniform_bits": 8}},
    "int4-group": {"amq": {"enabled": True, "uniform_bits": 4, "group_size": 16}},
    "adaptive": {"amq": {"enabled": True, "decision_layer": 2, "int4_below": 0.6, "int2_below": 0.3, "group_size": 16, "protect_first": 2}},
}


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("name", sorted(AMQ_CONFIGS))
def test_amq_compact_equals_masked_and_is_causal(family, name):
    from test_engine import _causality

    engine = Engine(TINY[family](), Config.from_dict(AMQ_CONFIGS[name]))
    ids = torch.randint(0, 99, (33,), generator=torch.Generator().manual_seed(9))
    a, b = engine(ids), engine(ids, compact=False)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    _causality(engine, 99)


def test_ledger_reports_bits_and_bytes():
    model = TINY["llama"]()
    ids = torch.randint(0, 99, (20,))
    off = Engine(model)(ids).ledger.as_dict()
    int8 = Engine(model, Config.from_dict(AMQ_CONFIGS["int8-kernel"]))(ids).ledger.as_dict()
    mixed = Engine(model, Config.from_dict(AMQ_CONFIGS["adaptive"]))(ids).ledger.as_dict()
    assert off["bits_per_token"] == 16 and int8["bits_per_token"] == 8
    assert int8["flops"]["total"] == off["flops"]["total"]  # FLOPs are FLOPs; bits are reported beside them
    assert int8["bit_weighted_flops"] < off["bit_weighted_flops"] == off["flops"]["total"]
    assert int8["weight_bytes"] < off["weight_bytes"] / 3
    assert 2 <= mixed["bits_per_token"] < 8 and set(mixed["bits_histogram"]) <= {"8", "4", "2"}


def test_int8_kernel_rows_are_independent_of_each_other():
    """fbgemm's per-tensor activation range must not couple rows (causality, batch = rows alone)."""
    torch.manual_seed(3)
    w, b = torch.randn(64, 32), torch.randn(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kernel = Int8Kernel(quantize_int8(w), b)
    x = torch.randn(9, 32) * torch.rand(9, 1) * 10
    assert torch.equal(kernel(x), torch.cat([kernel(x[i : i + 1]) for i in range(9)]))


def test_smoothing_factors_follow_smoothquant_and_preserve_the_product():
    from quicksilver.quant import smoothing_factors

    w = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
    a = torch.tensor([9.0, 1.0])
    s = smoothing_factors(a, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([9.0**0.5 / 1.0**0.5, 1.0 / 4.0**0.5]))
    torch.manual_seed(4)
    x = torch.randn(16, 64)
    x[:, 3] *= 50  # an outlier channel, as LLM activations have
    w = torch.randn(32, 64) * 0.05
    plain = QuantizedLinear(w, None, None, activation_quant=True)  # W8A8: smoothing helps activation quantization
    smooth = QuantizedLinear(w, None, None, smoothing_factors(x.abs().amax(0), w, 0.5), activation_quant=True)
    bits = torch.full((16,), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert snr_db(x @ w.T, smooth(x, bits)) > snr_db(x @ w.T, plain(x, bits))


def test_smoothing_needs_calibration_text_and_stays_causal():
    from test_engine import _causality

    model = TINY["llama"]()
    cfg = Config.from_dict({"amq": {"enabled": True, "uniform_bits": 8, "smoothing": 0.5}})
    with pytest.raises(QuicksilverError, match="calibration"):
        Engine(model, cfg)
    engine = Engine(model, cfg, calibration_ids=torch.randint(0, 99, (64,)))
    assert engine.config.amq.smoothing == 0.5 and not engine.config.is_off  # the calibration pass restored the config
    ids = torch.randint(0, 99, (30,))
    assert torch.allclose(engine(ids).logits, engine(ids, compact=False).logits, atol=1e-5)
    _causality(engine, 99)
