"""Models spread over devices: the engine's rows follow each layer; offloaded weights are refused."""

import pytest
import torch

from conftest import tiny_llama
from quicksilver import rows as rows_module
from quicksilver.adapters.base import FamilyAdapter, LayerParams
from quicksilver.config import Config
from quicksilver.engine import Engine
from quicksilver.errors import QuicksilverError
from quicksilver.models import check_weights_readable, load_model

STACK = {"halting": {"enabled": True, "threshold": 0.6, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 2},
         "kv": {"enabled": True, "recent_window": 6, "sink_tokens": 1},
         "fusion": {"enabled": True, "layer": 2, "threshold": 0.0, "window": 2, "protect_first": 2}}


@pytest.mark.parametrize("settings", [{}, STACK], ids=["off", "stack"])
def test_rows_follow_every_layer_device(monkeypatch, settings):
    # CPU has one device, but torch.device("cpu", 0) != torch.device("cpu"): claiming that every
    # layer lives on "cpu:0" makes the engine move its rows' state before every layer, as it would
    # between GPUs, and the numbers must not change.
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 99, (33,), generator=torch.Generator().manual_seed(1))
    config = Config.from_dict(settings)
    ref = Engine(model, config)(ids)
    moves = []
    real = rows_module.to_device
    monkeypatch.setattr(rows_module, "to_device", lambda d, *v: moves.append(d) or real(d, *v))
    monkeypatch.setattr(LayerParams, "device", property(lambda self: torch.device("cpu", 0)))
    monkeypatch.setattr(FamilyAdapter, "output_device", property(lambda self: torch.device("cpu", 0)))
    out = Engine(model, config)(ids)
    assert len(moves) == model.config.num_hidden_layers + 1  # before every layer, and to the head
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert out.ledger.as_dict() == ref.ledger.as_dict()
    if settings:
        assert ref.ledger.fused_tokens > 0  # fusion's bias was rebuilt on the new device


def test_device_map_auto_loads_and_equals_stock(tmp_path):
    from tiny_folder import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny")
    model, _ = load_model(folder, device_map="auto")  # CPU only here: every layer on cpu
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ids = torch.randint(0, 500, (20,), generator=torch.Generator().manual_seed(0))
    assert (Engine(model)(ids).logits - model(ids[None]).logits[0]).abs().max() <= 1e-5
    with pytest.raises(QuicksilverError, match="device map 'everywhere' is not supported"):
        load_model(folder, device_map="everywhere")


def test_offloaded_weights_are_refused():
    with torch.device("meta"):  # what accelerate leaves behind for offloaded layers
        model = tiny_llama()
    with pytest.raises(QuicksilverError, match="offloads weights to CPU"):
        check_weights_readable(model)
    model = tiny_llama()
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": "disk"}
    with pytest.raises(QuicksilverError, match="offloads weights to disk"):
        check_weights_readable(model)
    check_weights_readable(tiny_llama())  # an ordinary model passes
