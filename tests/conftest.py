"""Shared fixtures: tiny random-weight GPT-2 and Llama (milliseconds to build), and the real default model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 99

# Kernel choice by timing belongs to the machine, not to correctness tests (every kernel of a
# dispatch computes the same function): skip the measurement here; tests/test_kernels.py
# exercises it on its own table.
os.environ.setdefault("QUICKSILVER_KERNELS", "unmeasured")
# Compiling a decode step takes seconds: only tests/test_compiled.py compiles (it sets this per test).
os.environ.setdefault("QUICKSILVER_COMPILE", "0")


def tiny_llama(seed: int = 0, attn: str = "sdpa", **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=attn))
    return model.eval().requires_grad_(False)


def tiny_gpt2(seed: int = 0, attn: str = "sdpa", **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256)
    cfg.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation=attn))
    return model.eval().requires_grad_(False)


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(TINY))
def tiny_model(request):
    return TINY[request.param]()


@pytest.fixture(scope="session")
def default_model():
    """The real smollm2-135m (converted into the cache once, then under a second to load)."""
    from quicksilver import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def preset_engine(default_model):
    """``preset_engine(name)``: the default model's engine for a preset, built once per session
    (quantizing and calibrating a preset takes seconds; several tests use the same engines)."""
    from quicksilver.config import Config
    from quicksilver.evaluate import make_engine

    built = {}
    model, tok = default_model

    def get(name: str):
        if name not in built:
            built[name] = make_engine(model, tok, Config.preset(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_folder_model(tmp_path_factory):
    """A tiny random Llama with the default model's tokenizer, as a model folder (its path) and loaded
    (a LoadedModel): what whole-pipeline tests (sweep, calibrate, the CLI) run in milliseconds per pass."""
    from tiny_folder import save_tiny_llama

    from quicksilver import load_model

    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-model"), max_position_embeddings=512)
    return folder, load_model(folder, dtype="float32")
