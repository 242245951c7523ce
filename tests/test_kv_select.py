"""Importance rules of KV Cache Skipping: causal, compact == masked, budgets kept, caches really shrink."""

import pytest
import torch

from conftest import TINY
from quicksilver.decoding import generate
from quicksilver import attention
from quicksilver.cache import SequenceCache
from quicksilver.config import Config
from quicksilver.mechanisms.kv_rules import RULES as KV_RULES
from quicksilver.engine import Engine
from quicksilver.errors import QuicksilverError
from quicksilver.mechanisms import kv_select

RULES = ("knorm", "h2o", "tova", "snapkv", "quest")


def _kv(selection, **extra):
    kv = {"enabled": True, "selection": selection, "keep_fraction": 0.4, "sink_tokens": 1, "recent_window": 4,
          "page_size": 2, "observation": 3}
    return Config.from_dict({"kv": {**kv, **extra}})


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 6)  # several query blocks in a short sequence


def _check_causal_and_masked(engine):
    """Changing tokens from 18 on changes no logit before 18, and the compact path equals the masked
    reference; returns (the input, its output, the masked path's output, the generator for more draws)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 99, (40,), generator=g)
    b = a.clone()
    b[18:] = torch.randint(0, 99, (22,), generator=g)
    la, lb = engine(a), engine(b)
    assert torch.equal(la.logits[:18], lb.logits[:18])
    assert not torch.equal(la.logits[18:], lb.logits[18:])
    masked = engine(a, compact=False)
    assert torch.allclose(la.logits, masked.logits, atol=1e-5)
    return a, la, masked, g


@pytest.mark.parametrize("selection", RULES)
def test_rules_are_causal_and_equal_the_masked_reference(selection):
    _, la, masked, _ = _check_causal_and_masked(Engine(TINY["llama"](seed=3), _kv(selection)))
    stats = la.ledger.as_dict()
    assert stats["kv_fraction"] == masked.ledger.as_dict()["kv_fraction"]
    assert 0.3 < stats["kv_fraction"] < 0.75  # really skipped, near the 40% asked (recent windows of blocks add some)


@pytest.mark.parametrize("selection", RULES)
def test_each_kv_head_chooses_its_own_keys(selection):
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(40, 4, 8, generator=g), torch.randn(40, 2, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    pos = torch.arange(40)
    kv = _kv(selection).kv
    _, pairs, mask = attention.attend_selected(q, k, v, pos, pos, 0.35, kv, return_mask=True)
    assert mask.shape == (2, 40, 40) and not torch.equal(mask[0], mask[1])
    assert torch.equal(mask[0].sum(1), mask[1].sum(1)) and pairs == int(mask[0].sum())  # same budget per head
    assert not torch.triu(mask, diagonal=1).any()


@pytest.mark.parametrize("selection", RULES)
def test_one_query_through_the_decode_kernel_equals_its_masked_reference(selection):
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, 4, 8, generator=g), torch.randn(60, 2, 8, generator=g), torch.randn(60, 2, 8, generator=g)
    k_pos, kv = torch.arange(60), _kv(selection).kv
    out, _, mask = attention.attend_selected(q, k, v, torch.tensor([59]), k_pos, 0.35, kv, return_mask=True)
    assert 0 < int(mask[0].sum()) < 60  # really selected a subset
    ref = attention._sdpa(q, k, v, 0.35, mask=attention._additive(mask, q.dtype))
    assert torch.allclose(out, ref, atol=1e-5)


def test_page_summaries_are_computed_once_per_page_and_follow_truncation():
    g = torch.Generator().manual_seed(0)
    k, pos = torch.randn(50, 2, 4, generator=g), torch.arange(50)
    pages = kv_select.PageSummaries(4)
    for n in (9, 10, 17, 33, 12, 50):  # growing, then cut back (a rollback), then growing again
        kmin, kmax = pages.update(k[:n], pos[:n], 1)
        full = k[1 : 1 + (n - 1) // 4 * 4].view(-1, 4, 2, 4)
        assert torch.equal(kmin, full.amin(1).transpose(0, 1)) and torch.equal(kmax, full.amax(1).transpose(0, 1))  # head-major
    k2 = k.clone()
    k2[5] += 10  # a different cache with the same length: noticed by the last summarized position only if it moved
    pages.update(k2[:50], pos[:50] + 1, 1)
    assert torch.equal(pages.kmax[:, :12], k2[1:49].view(12, 4, 2, 4).amax(1).transpose(0, 1))


def test_quest_bound_is_exact_on_pages_of_one_key_and_an_upper_bound_on_larger_ones():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(3, 4, 8, generator=g), torch.randn(32, 2, 8, generator=g)
    pos = torch.arange(32)
    kmin, kmax = kv_select.PageSummaries(1).update(k, pos, 0)
    exact = torch.einsum("okgd,tkd->okgt", q.view(3, 2, 2, 8), k) * 0.5  # (To, Hkv, g, T)
    assert torch.allclose(kv_select.quest_page_scores(q, kmin, kmax, 0.5), exact.softmax(-1).amax(dim=(0, 2)).T, atol=1e-6)
    kmin, kmax = kv_select.PageSummaries(4).update(k, pos, 0)
    bound = torch.baddbmm(torch.bmm(q.view(3, 2, 2, 8).transpose(0, 1).reshape(2, 6, 8).clamp(min=0), kmax.transpose(1, 2)),
                          q.view(3, 2, 2, 8).transpose(0, 1).reshape(2, 6, 8).clamp(max=0), kmin.transpose(1, 2))  # (Hkv, To*g, P)
    best = exact.view(3, 2, 2, 8, 4).amax(-1).permute(1, 0, 2, 3).reshape(2, 6, 8) / 0.5  # the best key of each page
    assert (bound >= best - 1e-5).all()


def test_quest_blocks_on_coarser_pages_are_causal_and_equal_the_masked_reference():
    model = TINY["llama"](seed=3)
    a, la, _, g = _check_causal_and_masked(Engine(model, _kv("quest", block_pages=4)))
    assert not torch.equal(la.logits, Engine(model, _kv("quest")).__call__(a).logits)  # the coarser pages chose differently
    kmin, kmax = kv_select.PageSummaries(2).update(torch.randn(13, 2, 4, generator=g), torch.arange(13), 1)
    cmin, cmax = kv_select.coarser_pages(kmin, kmax, 2)  # 6 pages of 2 -> 3 pages of 4
    assert torch.equal(cmax[:, 1], torch.maximum(kmax[:, 2], kmax[:, 3])) and cmin.shape == (2, 3, 4)


def test_block_summaries_grow_with_their_pages_and_follow_truncation():
    g = torch.Generator().manual_seed(8)
    k, pos = torch.randn(60, 2, 4, generator=g), torch.arange(60)
    pages = kv_select.PageSummaries(2, coarse=3)
    for n in (7, 8, 20, 33, 13, 60):  # growing a step at a time or in jumps, cut back, growing again
        kmin, kmax = pages.update(k[:n], pos[:n], 1)
        want = kv_select.coarser_pages(kmin, kmax, 3)
        assert all(torch.equal(a, b) for a, b in zip(pages.blocks(), want))


def test_quest_question_picks_fine_pages_and_a_decode_step_block_pages():
    # block_pages: a run of queries appended to a cache (a question) still picks pages of page_size keys,
    # while a single decode step reads whole blocks (its scoring reads 1/factor of the summaries).
    g = torch.Generator().manual_seed(9)
    n, c = 64, 6
    q, k, v = torch.randn(c, 4, 8, generator=g), torch.randn(n + c, 2, 8, generator=g), torch.randn(n + c, 2, 8, generator=g)
    fine, blocks, coarse = _kv("quest").kv, _kv("quest", block_pages=4).kv, _kv("quest", page_size=4).kv
    q_pos, k_pos = torch.arange(n, n + c), torch.arange(n + c)
    question = [attention.attend_selected(q, k, v, q_pos, k_pos, 0.35, kv, return_mask=True)[2] for kv in (fine, blocks)]
    assert torch.equal(question[0], question[1])
    step = [attention.attend_selected(q[:1], k[: n + 1], v[: n + 1], q_pos[:1], k_pos[: n + 1], 0.35, kv, return_mask=True)[2]
            for kv in (fine, blocks, coarse)]
    assert torch.equal(step[1], step[2]) and not torch.equal(step[0], step[1])


def test_rules_choose_differently():
    model = TINY["llama"](seed=3)
    ids = torch.randint(0, 99, (40,), generator=torch.Generator().manual_seed(2))
    logits = [Engine(model, _kv(s))(ids).logits for s in RULES]
    assert all(not torch.equal(logits[0][-1], other[-1]) for other in logits[1:])


def test_quest_with_halted_rows_matches_masked_reference():
    model = TINY["gpt2"](seed=2)
    cfg = _kv("quest").to_dict()
    cfg["halting"] = {"enabled": True, "threshold": 0.6, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 2}
    engine = Engine(model, Config.from_dict(cfg))
    ids = torch.randint(0, 99, (33,), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(engine(ids).logits, engine(ids, compact=False).logits, atol=1e-5)


def test_compress_index_keeps_sinks_recent_and_each_heads_lowest_norms():
    k = torch.ones(12, 2, 2)
    k[3, 0] *= 0.1  # the lowest norm among head 0's older keys
    k[6, 1] *= 0.1  # and among head 1's
    pos = torch.arange(12)
    q = torch.randn(1, 2, 2)
    index = kv_select.compress_index(KV_RULES["knorm"], 0.5, k, pos, q, pos[-1:], 1.0, sinks=2, recent=4, observation=1)
    assert index.tolist() == [[0, 1, 3, 9, 10, 11], [0, 1, 6, 9, 10, 11]]  # 2 sinks + 1 older + 3 recent = ceil(0.5 * 12)


def test_per_head_keep_moves_each_heads_entries():
    cache = SequenceCache(1)
    k = torch.arange(6.0)[:, None, None].expand(6, 2, 3).clone()  # entry i holds i in both heads
    k[:, 1] += 100
    cache.append(0, k, -k, torch.arange(6))
    cache.keep(0, torch.tensor([[0, 2, 5], [0, 4, 5]]))
    e = cache.get(0)
    assert e.k[:, 0, 0].tolist() == [0, 2, 5] and e.k[:, 1, 0].tolist() == [100, 104, 105]
    assert torch.equal(e.v, -e.k) and e.pos.tolist() == [0, 4, 5]  # the latest of the heads' positions


@pytest.mark.parametrize("selection", ("knorm", "tova", "snapkv", "h2o"))
def test_generation_cache_shrinks_to_the_kept_fraction(selection):
    model = TINY["llama"](seed=1)
    engine = Engine(model, _kv(selection, keep_fraction=0.25, recent_window=8))
    prompt = torch.randint(0, 99, (120,), generator=torch.Generator().manual_seed(0))
    cache = SequenceCache(4)
    from quicksilver.decoding import decode_one_token, prefill

    logits, _ = prefill(engine, prompt, cache)
    assert all(cache.count(l) == 30 for l in range(4))  # ceil(0.25 * 120)
    tok = logits.argmax(-1)
    for _ in range(12):
        tok = decode_one_token(engine, tok, [cache])[0].argmax(-1)
    kept = [cache.count(l) / cache.length for l in range(4)]
    if selection == "snapkv":  # compresses the prompt only; generated tokens stay
        assert all(c == 30 + 12 for c in (cache.count(l) for l in range(4)))
    else:
        assert all(abs(f - 0.25) < 0.25 * 0.3 for f in kept)


def test_quest_decode_reads_fewer_keys_but_drops_none():
    model = TINY["llama"](seed=1)
    engine = Engine(model, _kv("quest", keep_fraction=0.25, recent_window=8))
    result = generate(engine, torch.randint(0, 99, (100,)), 4)
    assert result.kv_bytes == result.kv_full_bytes  # every entry kept
    assert result.ledger["kv_fraction"] < 0.6


@pytest.mark.parametrize("bad,message", [({"selection": "random"}, "selection"), ({"keep_fraction": 0}, "keep_fraction"),
                                         ({"keep_fraction": 1.5}, "keep_fraction"), ({"page_size": 0}, "page_size"),
                                         ({"page_size": 4, "block_pages": 6}, "block_pages")])
def test_bad_selection_settings_are_rejected(bad, message):
    with pytest.raises(QuicksilverError, match=message):
        Config.from_dict({"kv": bad})


@pytest.mark.parametrize("selection", ("quest", "snapkv", "window"))
def test_reach_is_where_generation_first_skips_a_key(selection):
    from quicksilver.decoding import decode_one_token, prefill

    extra = {"recent_window": 8, "sink_tokens": 2, "keep_fraction": 0.25}
    cfg = _kv(selection, **extra)
    reach = cfg.kv.reach()
    assert reach == 2 + 8 + 1
    engine = Engine(TINY["llama"](seed=1), cfg)
    ids = torch.randint(0, 99, (reach,), generator=torch.Generator().manual_seed(0))
    for n, every_key in ((reach - 1, True), (reach, False)):  # the query at position n - 1, after a prompt of n - 1 tokens
        cache = SequenceCache(4)
        prefill(engine, ids[: n - 1], cache)
        _, ledger = decode_one_token(engine, ids[n - 1 : n], [cache])
        assert (ledger.as_dict()["kv_fraction"] == 1.0) == every_key
    assert kv_select.budget(0.9, 20) == 19 and _kv("quest", keep_fraction=0.95, recent_window=8, sink_tokens=2).kv.reach() == 20


@pytest.mark.parametrize("selection", RULES)
def test_short_prompts_whose_queries_sit_among_the_sinks_generate(selection):
    engine = Engine(TINY["llama"](seed=1), _kv(selection, sink_tokens=4, recent_window=2, keep_fraction=0.25))
    assert len(generate(engine, torch.randint(0, 99, (3,)), 4).tokens[0]) == 4


def test_quest_extension_reads_itself_in_full_and_the_kept_fraction_of_the_cache_before_it():
    # A question after its context (or a continuation after its prefix): the context is compressed, the question is not.
    g = torch.Generator().manual_seed(2)
    n, c = 40, 12
    q, k, v = torch.randn(c, 4, 8, generator=g), torch.randn(n + c, 2, 8, generator=g), torch.randn(n + c, 2, 8, generator=g)
    kv = _kv("quest").kv  # keep 0.4, 1 sink, recent 4, pages of 2
    q_pos, k_pos = torch.arange(n, n + c), torch.arange(n + c)
    out, _, mask = attention.attend_selected(q, k, v, q_pos, k_pos, 0.35, kv, return_mask=True)
    assert torch.equal(mask[:, :, n:], torch.ones(c, c, dtype=torch.bool).tril().expand(2, -1, -1))  # its own keys, causally
    before = mask[:, :, :n].sum(-1)
    assert (before <= 16).all() and (before >= 16 - kv.page_size).all()  # ceil(0.4 * 40) of the 40 positions before it
    assert mask[:, :, 0].all() and mask[:, 0, n - 3 : n].all()  # the sink; the first query's recent keys
    q2 = q.clone()
    q2[6:] = torch.randn(c - 6, 4, 8, generator=g)
    out2 = attention.attend_selected(q2, k, v, q_pos, k_pos, 0.35, kv)[0]
    assert torch.equal(out[:6], out2[:6]) and not torch.equal(out[6:], out2[6:])  # causal within the extension


def test_quest_continuation_after_a_cached_prefix_is_causal():
    from quicksilver.needle import extend

    engine = Engine(TINY["llama"](seed=3), _kv("quest", keep_fraction=0.3))
    g = torch.Generator().manual_seed(6)
    prefix, a = torch.randint(0, 99, (50,), generator=g), torch.randint(0, 99, (20,), generator=g)
    b = a.clone()
    b[9:] = torch.randint(0, 99, (11,), generator=g)
    rows = torch.arange(20)
    logits = []
    for cont in (a, b):
        cache = SequenceCache(4)
        from quicksilver.decoding import prefill

        prefill(engine, prefix, cache)
        logits.append(extend(engine, cont, cache, logit_rows=rows)[0])
    assert torch.equal(logits[0][:9], logits[1][:9]) and not torch.equal(logits[0][9:], logits[1][9:])


@pytest.mark.parametrize("selection", ("quest", "snapkv"))
def test_min_keys_reads_a_short_past_in_full_and_the_fraction_beyond(selection):
    assert kv_select.budget(0.25, 99, 40) == 40 and kv_select.budget(0.25, 29, 40) == 30 and kv_select.budget(0.25, 399, 40) == 100
    kv = _kv(selection, keep_fraction=0.25, min_keys=24).kv
    assert kv.reach() == 26  # the first decode step with more than 24 keys before it
    g = torch.Generator().manual_seed(10)
    q, k, v = torch.randn(60, 4, 8, generator=g), torch.randn(60, 2, 8, generator=g), torch.randn(60, 2, 8, generator=g)
    pos = torch.arange(60)
    if selection == "quest":  # teacher-forced: a block of queries reads max(24, 25%) of its first query's past
        mask = attention.attend_selected(q, k, v, pos, pos, 0.35, kv, return_mask=True)[2]
        assert torch.equal(mask[:, :24], torch.ones(24, 60, dtype=torch.bool).tril().expand(2, -1, -1))  # blocks before 24: all
        assert (mask[:, 48:].sum(-1) < pos[48:] + 1).all()  # the last block, whose first query has 48 keys: fewer
    else:  # a generation cache keeps at least min_keys entries
        assert kv_select.compress_index(KV_RULES[selection], 0.25, k[:20], pos[:20], q[:20], pos[:20], 0.35, 1, 4, 3, floor=24) is None
        index = kv_select.compress_index(KV_RULES[selection], 0.25, k, pos, q, pos, 0.35, 1, 4, 3, floor=24)
        assert index.shape == (2, 23)  # the next query (position 60) reads the 23 kept and itself


def test_quest_continuation_longer_than_a_question_still_chooses_per_query():
    # A continuation after its prefix picks each query's pages, as generating token by token would;
    # only queries that start a sequence choose together in blocks (QUERY_BLOCK is 6 here).
    g = torch.Generator().manual_seed(11)
    n, c = 80, 40
    q, k, v = torch.randn(c, 4, 8, generator=g), torch.randn(n + c, 2, 8, generator=g), torch.randn(n + c, 2, 8, generator=g)
    assert c > attention.QUEST_PER_QUERY
    mask = attention.attend_selected(q, k, v, torch.arange(n, n + c), torch.arange(n + c), 0.35, _kv("quest").kv, return_mask=True)[2]
    older = mask[:, :6, 1 : n - 4]  # the first six queries' choices among the older keys of the prefix
    assert any(not torch.equal(older[:, 0], older[:, i]) for i in range(1, 6))


def test_dense_prefill_reads_every_key_until_a_call_extends_the_cache():
    from quicksilver.decoding import decode_one_token, prefill

    model = TINY["llama"](seed=2)
    dense = Engine(model, _kv("quest", keep_fraction=0.25, dense_prefill=True))
    ids = torch.randint(0, 99, (60,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(dense(ids).logits, Engine(model)(ids).logits)  # a pass that starts the sequence: every key
    assert torch.equal(dense(ids, compact=False).logits, dense(ids).logits)
    cache = SequenceCache(4)
    logits, _ = prefill(dense, ids[:50], cache)
    _, ledger = decode_one_token(dense, logits.argmax(-1), [cache])
    assert ledger.as_dict()["kv_fraction"] < 0.6  # a decode step selects
