"""The compiled decode step (``quicksilver.compiled``): the same step as the eager loop, and an
eager fallback when the compiler fails."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from quicksilver import compiled
from quicksilver.config import Config
from quicksilver.engine import Engine
from quicksilver.decoding import decode_one_token, new_caches, prefill_batch

from conftest import tiny_gpt2, tiny_llama

HAS_CXX = bool(shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++"))  # inductor's CPU code needs one
PROMPTS = [torch.tensor([5, 7, 11, 13, 17, 19]), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5]), torch.tensor([8, 2])]


def _decode(engine, steps: int, use: bool):
    """Greedy steps of a ragged batch; (tokens per step, logits per step, live entries per layer)."""
    caches = new_caches(engine, [p.numel() + steps for p in PROMPTS])
    logits, _ = prefill_batch(engine, PROMPTS, caches)
    tokens, all_logits = [], []
    for _ in range(steps):
        nxt = logits.float().argmax(-1)
        tokens.append(nxt.tolist())
        logits, ledger = decode_one_token(engine, nxt, caches, compile=use)
        all_logits.append(logits)
    return tokens, all_logits, [c._n for c in caches], ledger.as_dict()


@pytest.fixture
def compiling(monkeypatch):
    monkeypatch.setenv("QUICKSILVER_COMPILE", "1")
    monkeypatch.setattr(compiled, "_failed", None)
    return monkeypatch


def test_the_compiled_step_equals_the_eager_one_in_float32(compiling):
    engine = Engine(tiny_llama(num_hidden_layers=2), "off")  # two layers: a smaller graph to compile
    assert compiled.structure(engine) is not None
    tokens, logits, counts, ledger = _decode(engine, 5, use=False)
    c_tokens, c_logits, c_counts, c_ledger = _decode(engine, 5, use=True)
    if HAS_CXX:
        assert compiled.failed() is None
    assert c_tokens == tokens and c_counts == counts
    for a, b in zip(logits, c_logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert c_ledger == ledger  # the same work counted
    assert compiled.wanted(engine, rows=3, steps=1) == HAS_CXX  # forced on, unless the compiler failed


def test_a_failing_compiler_falls_back_to_the_eager_step(compiling):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    engine = Engine(tiny_llama(), "off")
    tokens, logits, counts, _ = _decode(engine, 4, use=False)
    compiling.setattr(compiled, "BACKEND", broken)
    compiling.setattr(compiled, "_steps", {})
    f_tokens, f_logits, f_counts, _ = _decode(engine, 4, use=True)
    assert "no C++ compiler here" in compiled.failed()
    assert f_tokens == tokens and f_counts == counts  # the failed call left the caches as they were
    for a, b in zip(logits, f_logits):
        assert torch.equal(a, b)
    assert not compiled.wanted(engine, rows=3, steps=10_000)  # off for the rest of the process


@pytest.mark.parametrize("case", ["gpt2", "halting", "kvskip", "env-off"])
def test_where_the_compiled_step_does_not_apply(case, compiling):
    if case == "gpt2":
        engine = Engine(tiny_gpt2(), "off")
    elif case == "env-off":
        compiling.setenv("QUICKSILVER_COMPILE", "0")
        engine = Engine(tiny_llama(), "off")
    else:
        engine = Engine(tiny_llama(), Config.from_dict(
            {"halting": {"enabled": True, "min_layer": 1, "tail_layers": 1}} if case == "halting"
            else {"kv": {"enabled": True, "recent_window": 4, "sink_tokens": 1}}))
    assert not compiled.wanted(engine, rows=1, steps=10_000)
    if case != "env-off":
        assert compiled.structure(engine) is None
