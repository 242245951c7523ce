"""The engine's preallocated KV cache: in-place writes, rollback, subset keeping, lazy eviction."""

from __future__ import annotations

import torch

from quicksilver import Config
from quicksilver.cache import SequenceCache
from quicksilver.engine import Engine
from quicksilver.decoding import decode_one_token, prefill, prefill_batch

from conftest import tiny_llama


def _entries(n, start=0, heads=2, dim=4):
    k = torch.arange(start, start + n, dtype=torch.float32)[:, None, None].expand(n, heads, dim).clone()
    return k, -k, torch.arange(start, start + n)


def test_append_writes_in_place_without_reallocating():
    cache = SequenceCache(1, capacity=16)
    cache.append(0, *_entries(4))
    buf = cache._k[0]
    for t in range(4, 16):
        cache.append(0, *_entries(1, t))
    assert cache._k[0] is buf  # no growth within the capacity hint
    e = cache.get(0)
    assert e.pos.tolist() == list(range(16)) and torch.equal(e.k[:, 0, 0], torch.arange(16.0))
    cache.append(0, *_entries(1, 16))  # past the hint: grows, keeps the content
    assert cache.count(0) == 17 and cache.get(0).pos[-1] == 16 and torch.equal(cache.get(0).v[:, 0, 0], -torch.arange(17.0))


def test_keep_and_truncate():
    cache = SequenceCache(2)
    for layer in range(2):
        cache.append(layer, *_entries(10))
    cache.length = 10
    cache.keep(1, torch.tensor([0, 3, 7, 8]))
    assert cache.get(1).pos.tolist() == [0, 3, 7, 8] and cache.get(1).k[:, 0, 0].tolist() == [0, 3, 7, 8]
    assert cache.nbytes() == (10 + 4) * 2 * 2 * 4 * 4
    cache.truncate(7)
    assert cache.length == 7 and cache.get(0).pos.tolist() == list(range(7)) and cache.get(1).pos.tolist() == [0, 3]


def test_evict_is_lazy_and_keeps_sinks_window_and_margin():
    cache = SequenceCache(1, margin=2)
    cache.append(0, *_entries(100))
    cache.evict(0, next_pos=100, window=64, sinks=4)  # 30 stale entries, slack 2: compacts
    pos = cache.get(0).pos.tolist()
    assert pos[:4] == [0, 1, 2, 3] and pos[4] == 100 - 64 - 2 + 1 and pos[-1] == 99
    n = cache.count(0)
    cache.append(0, *_entries(1, 100))
    cache.evict(0, next_pos=101, window=64, sinks=4)  # one stale entry is below the slack
    assert cache.count(0) == n + 1


def test_rollback_then_rerun_equals_never_extended():
    engine = Engine(tiny_llama())
    prompt = torch.tensor([5, 9, 3, 7, 1, 4])
    ref, rolled = SequenceCache(4), SequenceCache(4)
    prefill(engine, prompt, ref)
    prefill(engine, prompt, rolled)
    # Extend by a 3-token "draft", then roll back to the prompt.
    engine.run(torch.tensor([2, 8, 6]), torch.tensor([6, 7, 8]), [(0, 3)], [rolled])
    rolled.truncate(6)
    a, _ = decode_one_token(engine, torch.tensor([11]), [ref])
    b, _ = decode_one_token(engine, torch.tensor([11]), [rolled])
    assert torch.equal(a, b)
    for layer in range(4):
        assert torch.equal(ref.get(layer).k, rolled.get(layer).k) and torch.equal(ref.get(layer).pos, rolled.get(layer).pos)


def test_batched_prefill_equals_each_prompt_alone():
    engine = Engine(tiny_llama(), Config.preset("off"))
    prompts = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([9, 8]), torch.tensor([7, 7, 7, 3])]
    caches = [SequenceCache(4) for _ in prompts]
    together, _ = prefill_batch(engine, prompts, caches)
    for p, row, cache in zip(prompts, together, caches):
        alone_cache = SequenceCache(4)
        alone, _ = prefill(engine, p, alone_cache)
        torch.testing.assert_close(row, alone[0], rtol=0, atol=1e-5)
        assert cache.length == p.numel() and torch.allclose(cache.get(3).k, alone_cache.get(3).k, atol=1e-6)


def test_pooled_batch_decode_equals_each_row_decoded_alone():
    from quicksilver.cache import CachePool

    engine = Engine(tiny_llama())
    prompts = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([9, 8]), torch.tensor([7, 7, 7, 3])]
    pool = CachePool(4, 3, 16, 2, 8, torch.float32)
    prefill_batch(engine, prompts, pool.rows)
    alone = [SequenceCache(4) for _ in prompts]
    for p, c in zip(prompts, alone):
        prefill(engine, p, c)
    tokens = torch.tensor([11, 12, 13])
    for step in range(3):
        rows = [0, 1, 2] if step < 2 else [0, 2]  # a finished row leaves: slots no longer contiguous
        together, _ = decode_one_token(engine, tokens[rows], [pool.rows[i] for i in rows])
        for j, i in enumerate(rows):
            single, _ = decode_one_token(engine, tokens[i : i + 1], [alone[i]])
            torch.testing.assert_close(together[j], single[0], rtol=0, atol=1e-5)
    assert all(c.pool is pool for c in pool.rows) and pool.rows[1].count(0) == 4
