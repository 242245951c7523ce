"""Contextual Token Fusion: the rule on hand-made states, a hand-built group, causality, equivalence."""

import pytest
import torch

from conftest import TINY
from quicksilver.config import Config
from quicksilver.engine import Engine
from quicksilver.errors import QuicksilverError
from quicksilver.mechanisms import ContextualTokenFusion


def test_rule_fuses_near_duplicates_with_earlier_tokens_only():
    f = ContextualTokenFusion(enabled=True, threshold=0.99, window=2, protect_first=1, prefix=0)
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])
    h = torch.stack([a, a, b, b * 3, a, c, b])  # rows 1 and 3 duplicate their predecessor
    rep = f.representatives(h, torch.arange(7))
    assert rep.tolist() == [0, 0, 2, 2, 4, 5, 6]  # row 4 equals row 0, but row 0 is outside the window
    assert all(r <= i for i, r in enumerate(rep.tolist()))


def test_groups_resolve_to_the_earliest_member_and_protected_rows_stay():
    f = ContextualTokenFusion(enabled=True, threshold=0.99, window=1, protect_first=2, prefix=0)
    h = torch.ones(5, 4)
    assert f.representatives(h, torch.arange(5)).tolist() == [0, 1, 1, 1, 1]


def test_prefix_rule_fuses_a_repeat_only_when_its_context_repeats_too():
    """The harmful case of docs/results/fusion_why.md: the same token after a different
    token ("start pos" ... "parent pos") must not fuse; a repeated phrase may."""
    start, parent, pos, colon = torch.eye(4)
    f = ContextualTokenFusion(enabled=True, threshold=0.99, window=4, protect_first=0, prefix=1)
    h = torch.stack([start, pos, colon, parent, pos])
    assert f.representatives(h, torch.arange(5)).tolist() == [0, 1, 2, 3, 4]
    assert ContextualTokenFusion(enabled=True, threshold=0.99, window=4, protect_first=0, prefix=0).representatives(
        h, torch.arange(5)).tolist() == [0, 1, 2, 3, 1]
    h = torch.stack([colon, start, pos, colon, start, pos])  # "start pos" repeats after the same token
    # Row 3 repeats row 0, which has no predecessor to compare: only rows 4 and 5 fuse.
    assert f.representatives(h, torch.arange(6)).tolist() == [0, 1, 2, 3, 1, 2]
    two = ContextualTokenFusion(enabled=True, threshold=0.99, window=4, protect_first=0, prefix=2)
    assert two.representatives(h, torch.arange(6)).tolist() == [0, 1, 2, 3, 4, 2]


def test_prefix_rule_reads_only_earlier_rows():
    f = ContextualTokenFusion(enabled=True, threshold=0.2, window=3, protect_first=1, prefix=2)
    h = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    full = f.representatives(h, torch.arange(40))
    assert (full != torch.arange(40)).sum() > 3
    for k in (5, 17, 33):
        assert torch.equal(f.representatives(h[:k], torch.arange(k)), full[:k])


def test_hand_built_group_follows_the_delta_rule():
    """Every token from position 3 joins row 2's group after layer 2. Row 2 never sees its
    members (they come later), so its states are the stock model's; a member's final state
    must be its own state after layer 2 plus row 2's update from layer 2 to the end."""
    model = TINY["llama"](seed=2)
    ids = torch.randint(0, 99, (12,), generator=torch.Generator().manual_seed(1))
    cfg = {"enabled": True, "layer": 2, "threshold": -1.0, "window": 1, "protect_first": 3, "output": "delta"}
    logits = Engine(model, Config.from_dict({"fusion": cfg}))(ids).logits
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda mod, args: captured.update(pre_norm=args[0][0]))
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states
    hook.remove()
    after2, final = hs[2][0], captured["pre_norm"]
    for m in range(3, 12):
        expected = model.lm_head(model.model.norm(after2[m] + (final[2] - after2[2])))
        assert torch.allclose(logits[m], expected, atol=1e-5)
    assert torch.allclose(logits[:3], model(ids[None]).logits[0, :3], atol=1e-5)


def test_copy_rule_gives_a_member_its_representatives_logits():
    model = TINY["gpt2"](seed=1)
    ids = torch.randint(0, 99, (20,), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, Config.from_dict({"fusion": {"enabled": True, "layer": 1, "threshold": -1.0, "window": 1, "output": "copy", "protect_first": 3}}))
    logits = engine(ids).logits
    # threshold -1 with window 1: every unprotected token joins row 2's group (the chain resolves to its root)
    for i in range(3, 20):
        assert torch.equal(logits[i], logits[2])


def test_delta_rule_differs_from_copy_and_off_equals_stock():
    model = TINY["llama"]()
    ids = torch.randint(0, 99, (20,))
    base = {"enabled": True, "layer": 2, "threshold": -1.0, "window": 1, "protect_first": 3}
    delta = Engine(model, Config.from_dict({"fusion": {**base, "output": "delta"}}))(ids).logits
    copy = Engine(model, Config.from_dict({"fusion": {**base, "output": "copy"}}))(ids).logits
    assert torch.equal(delta[:3], copy[:3]) and not torch.equal(delta[3:], copy[3:])
    never = Engine(model, Config.from_dict({"fusion": {**base, "threshold": 1.0}}))(ids)
    assert never.ledger.fused_tokens == 0
    assert torch.allclose(never.logits, Engine(model)(ids).logits, atol=1e-6)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("output", ["delta", "copy"])
@pytest.mark.parametrize("extra", [{}, {"kv": {"enabled": True, "recent_window": 6, "sink_tokens": 1, "policy": "skip"}},
                                   {"halting": {"enabled": True, "threshold": 0.6, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 2}}])
def test_fusion_compact_equals_masked_and_is_causal(family, output, extra, prefix=0, threshold=0.3):
    from test_engine import _causality

    cfg = Config.from_dict({"fusion": {"enabled": True, "layer": 2, "threshold": threshold, "window": 3, "output": output, "protect_first": 2,
                                       "prefix": prefix}, **extra})
    engine = Engine(TINY[family](), cfg)
    ids = torch.randint(0, 99, (41,), generator=torch.Generator().manual_seed(6))
    a, b = engine(ids), engine(ids, compact=False)
    assert a.ledger.fused_tokens > 0
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert a.ledger.as_dict() == b.ledger.as_dict()
    _causality(engine, 99)


@pytest.mark.parametrize("family", sorted(TINY))
def test_prefix_rule_in_the_engine_equals_masked_and_is_causal(family):
    # Random tiny states are far apart: a low bar, so that some pairs and their prefixes match.
    test_fusion_compact_equals_masked_and_is_causal(family, "delta", {}, prefix=2, threshold=0.1)


@pytest.mark.parametrize(
    "settings,message",
    [({"threshold": 1.5}, "threshold"), ({"window": 0}, "window"), ({"output": "mean"}, "output"), ({"layer": 0}, "layer"),
     ({"prefix": -1}, "prefix")],
)
def test_bad_fusion_settings(settings, message):
    with pytest.raises(QuicksilverError, match=message):
        Config.from_dict({"fusion": settings})


def test_fusion_layer_past_the_model():
    with pytest.raises(QuicksilverError, match="fusion.layer"):
        Engine(TINY["llama"](), Config.from_dict({"fusion": {"enabled": True, "layer": 4}}))
