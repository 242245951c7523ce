"""Weight-only kernels over one nested int8 copy: same function, rows independent, measured dispatch."""

from __future__ import annotations

import json

import pytest
import torch

from quicksilver import kernels as K
from quicksilver import native
from quicksilver.quant import dequantize, quantize_int8, snr_db


def _weight(group_size, out_f=96, in_f=128, bias=True):
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.05
    qw = quantize_int8(w, group_size)
    b = torch.randn(out_f) * 0.01 if bias else None
    return qw, K.NestedWeight(qw.codes, qw.scales, group_size, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_every_kernel_computes_the_dequantized_slice(bits, group_size, dtype):
    qw, nw = _weight(group_size)
    x = torch.randn(9, 128)
    ref = x @ dequantize(qw, bits).T + nw.bias
    names = K.candidates(nw, bits, dtype)
    assert "dequant" in names and (bits == 2 or len(names) >= 2)  # the CPU has a packed kernel for 8 and 4
    for name in names:
        out = K.matmul(nw, x.to(dtype), bits, kernel=name).float()
        assert snr_db(ref, out) > (60 if dtype == torch.float32 else 38), name


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_output_does_not_depend_on_its_neighbours(bits):
    _, nw = _weight(None)
    x = (torch.randn(9, 128) * torch.rand(9, 1) * 10).bfloat16()
    names = K.candidates(nw, bits, torch.bfloat16)
    assert any(n.startswith("native") for n in names) or not native.available()
    for name in names:
        together = K.matmul(nw, x, bits, kernel=name)
        alone = torch.cat([K.matmul(nw, x[i : i + 1], bits, kernel=name) for i in range(9)])
        assert torch.equal(together, alone), name


def test_int4_reads_the_high_plane_only_and_int8_is_both_planes():
    qw, nw = _weight(None, bias=False)
    hi = qw.codes.to(torch.int32) >> 4
    x = torch.randn(3, 128)
    high_only = x @ ((hi * 16 + 8).float() * qw.scales).T
    torch.testing.assert_close(K.matmul(nw, x, 4, kernel="int4pack"), high_only, rtol=1e-4, atol=1e-4)
    packed, _, _ = nw.layout("int4pack", torch.float32)
    assert packed.numel() == qw.codes.numel() // 2  # half the bytes of the int8 codes
    torch.testing.assert_close(K.matmul(nw, x, 8, kernel="planes8"), x @ (qw.codes.float() * qw.scales).T, rtol=1e-4, atol=1e-4)


def test_dispatch_takes_the_fastest_measured_kernel_per_row_bucket(tmp_path, monkeypatch):
    monkeypatch.delenv("QUICKSILVER_KERNELS", raising=False)
    _, nw = _weight(None)
    table = K.KernelTable(tmp_path / "k.json")
    key = table.key(nw, 8, torch.float32)
    table.entries[key] = {"1": {"dequant": 30.0, "int8pack": 10.0, "planes8": 20.0},
                          "8": {"dequant": 30.0, "int8pack": 40.0, "planes8": 20.0},
                          "64": {"dequant": 5.0, "int8pack": 40.0, "planes8": 20.0},
                          "512": {"dequant": 5.0, "int8pack": 40.0, "planes8": 20.0}}
    assert [table.choose(nw, 8, n, torch.float32) for n in (1, 2, 5, 9, 40, 300, 4096)] == [
        "int8pack", "int8pack", "planes8", "planes8", "dequant", "dequant", "dequant"]
    assert [K.bucket(n) for n in (1, 2, 8, 22, 64, 181, 2000)] == [1, 1, 8, 8, 64, 64, 512]


def test_a_near_tie_goes_to_the_first_candidate_so_a_new_measurement_cannot_flip_it(tmp_path, monkeypatch):
    monkeypatch.delenv("QUICKSILVER_KERNELS", raising=False)
    _, nw = _weight(None)
    table = K.KernelTable(tmp_path / "k.json")
    key = table.key(nw, 8, torch.float32)
    first, second, *rest = K.candidates(nw, 8, torch.float32)
    slow = {name: 100.0 for name in rest}
    table.entries[key] = {"1": {first: 30.0, second: 29.0, **slow}, "8": {first: 30.0, second: 29.5, **slow},
                          "64": {first: 30.0, second: 25.0, **slow}, "512": {first: 29.0, second: 30.0, **slow}}
    assert [table.choose(nw, 8, n, torch.float32) for n in (1, 8, 64, 512)] == [first, first, second, first]


def test_missing_shapes_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("QUICKSILVER_KERNELS", raising=False)
    _, nw = _weight(None, out_f=32, in_f=64)
    path = tmp_path / "kernels" / "m.json"
    table = K.KernelTable(path)
    name = table.choose(nw, 4, 1, torch.float32)
    assert name in K.candidates(nw, 4)
    table.choose(nw, 4, 300, torch.float32)
    saved = json.loads(path.read_text())
    timings = saved[table.key(nw, 4, torch.float32)]
    assert set(timings) == {"1", "512"} and set(timings["1"]) == set(K.candidates(nw, 4))  # only the buckets met
    assert K.KernelTable(path).entries == saved  # reloaded, not measured again


def test_auto_dtype_follows_the_cpu_features(monkeypatch):
    from quicksilver import hardware
    from quicksilver.models import parse_dtype

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert parse_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert parse_dtype("auto") == torch.float32
    assert parse_dtype("float32") == torch.float32
