import math

import pytest
import torch
import torch.nn.functional as F

from quicksilver.errors import QuicksilverError
from quicksilver.evaluate import StockRunner, metrics, score_windows, window_plan, word_count, Totals


@pytest.mark.parametrize("n", [2, 7, 100, 513])
@pytest.mark.parametrize("window,stride", [(8, 7), (8, 3), (16, 1), (512, 511), (512, 100)])
@pytest.mark.parametrize("bos", [False, True])
def test_window_plan_scores_every_token_once(n, window, stride, bos):
    ctx = window - bos
    plan = window_plan(n, window, stride, bos)
    scored = [t for w in plan for t in range(w.score_from, w.end)]
    assert scored == list(range(0 if bos else 1, n))
    for w in plan:
        assert w.end - w.begin <= ctx
        assert w.begin <= w.score_from or (bos and w.score_from == w.begin)
        # without BOS a scored token always has at least one token of context
        assert bos or w.score_from > w.begin


@pytest.mark.parametrize(
    "args,message",
    [((10, 8, 0, False), "stride"), ((10, 8, -1, False), "stride"), ((10, 8, 8, False), "longer"), ((10, 1, 1, False), "window"), ((1, 8, 7, False), "too short")],
)
def test_window_plan_rejects_bad_settings(args, message):
    with pytest.raises(QuicksilverError, match=message):
        window_plan(*args)


def _hand_nll(model, ids: torch.Tensor) -> float:
    logits = model(ids[None]).logits[0].float()
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()


def test_perplexity_equals_hand_computation(tiny_model):
    ids = torch.randint(0, 99, (40,), generator=torch.Generator().manual_seed(1))
    (t,) = score_windows([StockRunner(tiny_model)], ids, window=64, stride=63, bos_id=None)
    assert t.count == 39
    assert t.nll == pytest.approx(_hand_nll(tiny_model, ids), rel=1e-5)


def test_strided_windows_equal_per_window_hand_computation(tiny_model):
    ids = torch.randint(0, 99, (50,), generator=torch.Generator().manual_seed(2))
    window, stride = 16, 5
    (t,) = score_windows([StockRunner(tiny_model)], ids, window, stride, bos_id=None)
    expected = 0.0
    for w in window_plan(50, window, stride, bos=False):
        ctx = ids[w.begin : w.end]
        logits = tiny_model(ctx[None]).logits[0]
        logp = F.log_softmax(logits.float(), -1)
        for target in range(w.score_from, w.end):
            expected -= logp[target - w.begin - 1, ids[target]].item()
    assert t.count == 49
    assert t.nll == pytest.approx(expected, rel=1e-5)


def test_bos_window_scores_first_token(tiny_model):
    ids = torch.randint(2, 99, (20,), generator=torch.Generator().manual_seed(3))
    (t,) = score_windows([StockRunner(tiny_model)], ids, window=32, stride=31, bos_id=1)
    with_bos = torch.cat([torch.tensor([1]), ids])
    assert t.count == 20
    assert t.nll == pytest.approx(_hand_nll(tiny_model, with_bos), rel=1e-5)


def test_second_runner_gets_kl_and_agreement_against_the_first(tiny_model):
    ids = torch.randint(0, 99, (30,), generator=torch.Generator().manual_seed(4))
    same = score_windows([StockRunner(tiny_model), StockRunner(tiny_model, "again")], ids, 32, 31, None)
    assert same[1].kl == pytest.approx(0.0, abs=1e-6)
    assert same[1].top1_agree == same[1].count
    assert same[0].flops == same[1].flops > 0


def test_metrics_formulas():
    t = Totals(nll=10.0, count=5, flops=100, seconds=2.0)
    m = metrics(t, n_bytes=20, n_words=4)
    assert m["perplexity"] == pytest.approx(math.exp(2.0))
    assert m["bits_per_byte"] == pytest.approx(10.0 / (20 * math.log(2)))
    assert m["word_perplexity"] == pytest.approx(math.exp(10.0 / 4))
    assert m["tokens_per_second"] == pytest.approx(2.5)


def test_word_count_splits_on_whitespace():
    assert word_count("  a b\n\nc\td ") == 4


def test_baseline_cache_gives_the_same_totals_and_runs_the_stock_model_once(tiny_model):
    """A sweep's rows share the stock model's results: every total but the stock wall clock is the
    uncached one, and the stock model runs on the first row only (warm-up included)."""
    from quicksilver.config import Config
    from quicksilver.engine import Engine
    from quicksilver.evaluate import BaselineCache, EngineRunner

    ids = torch.randint(0, 99, (70,), generator=torch.Generator().manual_seed(5))
    configs = [Config.from_dict({"kv": {"enabled": True, "sink_tokens": 2, "recent_window": 8}}),
               Config.from_dict({"amq": {"enabled": True, "decision_layer": 1, "int4_below": 0.5}})]
    calls = []

    class Counting(StockRunner):
        def __call__(self, input_ids, logit_rows):
            calls.append(input_ids.numel())
            return super().__call__(input_ids, logit_rows)

    cache = BaselineCache()
    for config in configs:
        runners = lambda stock: [stock, EngineRunner(Engine(tiny_model, config))]  # noqa: E731
        plain = score_windows(runners(StockRunner(tiny_model)), ids, 32, 31, None)
        before = len(calls)
        shared = score_windows(runners(Counting(tiny_model)), ids, 32, 31, None, baseline=cache)
        ran = len(calls) - before
        assert ran == (0 if config is not configs[0] else 3 + 1)  # 3 windows and one warm-up, first row only
        for p, s in zip(plain, shared):
            assert (s.nll, s.count, s.flops, s.kl, s.top1_agree) == pytest.approx((p.nll, p.count, p.flops, p.kl, p.top1_agree), rel=1e-6)
    # Other windows replace the cached plan rather than reusing it.
    score_windows([Counting(tiny_model)], ids, 16, 15, None, baseline=cache)
    assert cache.key[3:6] == ("cpu", 16, 15)
