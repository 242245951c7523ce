"""Speculative decoding: greedy output equals plain decoding, sampling follows the verifier's distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_llama

from quicksilver.decoding import generate
from quicksilver.cache import SequenceCache
from quicksilver.config import Config
from quicksilver.engine import Engine
from quicksilver.errors import QuicksilverError
from quicksilver.decoding import decode_one_token, make_probs, prefill
from quicksilver.decoding.speculative import (
    ModelDraft, PromptLookup, StepCosts, accept_greedy, accept_sampled, best_length, choose_drafts, draft_engine,
    expected_accepted, usable_sources,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models do microseconds of work per op: a second OpenMP thread only adds hand-off
    # latency, which dominates on a busy machine. Restored afterwards for the other modules.
    # Kernel choices measured here, in memory: the per-machine cache file is shared with other checkouts.
    from quicksilver import kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kernels.set_kernel_table(kernels.KernelTable(None))
    yield
    kernels.set_kernel_table(None)
    torch.set_num_threads(threads)


def _spec(sources: str, **extra) -> dict:
    # Random tiny models are never confident: confidence 0 lets the model drafts draft.
    return {"enabled": True, "sources": sources, "confidence": 0.0, **extra}


def _prompts():
    g = torch.Generator().manual_seed(1)
    loop = torch.randint(0, 99, (9,), generator=g)
    # One random prompt, one short, one that repeats itself (lookup drafts there): rows accept different lengths.
    return [torch.randint(0, 99, (13,), generator=g), torch.tensor([7, 3]), torch.cat([loop, loop, loop[:4]])]


@pytest.mark.parametrize("family", sorted(TINY))
def test_greedy_equals_plain_decoding(family):
    model = TINY[family]()
    prompts = _prompts()
    plain = Engine(model, Config())
    eos = generate(plain, prompts, 20).tokens[0][8]  # row 0 stops at its 9th token (or earlier), mid-draft for some sources
    ref = generate(plain, prompts, 20, eos_token_id=eos)
    for sources in ("lookup", "int8", "int4", "skip", "lookup,skip"):
        r = generate(Engine(model, Config.from_dict({"speculative": _spec(sources)})), prompts, 20, eos_token_id=eos)
        assert r.tokens == ref.tokens and r.stop_reasons == ref.stop_reasons, sources
        s = r.speculative
        assert s["verify_steps"] < sum(len(t) for t in r.tokens)  # drafts were accepted
        assert 0 < s["acceptance_rate"] <= 1 and s["tokens_per_step"] > 1
        assert set(s["sources"]) == set(sources.split(","))


def test_greedy_with_kv_window_and_other_mechanisms_equals_same_config_without_speculation():
    model = tiny_llama()
    base = {"kv": {"enabled": True, "recent_window": 8, "sink_tokens": 2},
            "halting": {"enabled": True, "threshold": 0.3, "min_layer": 1, "patience": 1, "tail_layers": 1}}
    prompts = _prompts() + [torch.arange(40) % 17]
    ref = generate(Engine(model, Config.from_dict(base)), prompts, 30)
    r = generate(Engine(model, Config.from_dict({**base, "speculative": _spec("lookup,skip", max_draft=6)})), prompts, 30)
    assert r.tokens == ref.tokens
    assert r.speculative["accepted"] > 0


@pytest.mark.parametrize("window", [None, 6])
def test_verify_rollback_then_decode_equals_one_token_steps(window):
    """Engine level: a verify pass over a partly wrong draft, rolled back, equals plain steps."""
    kv = {"kv": {"enabled": True, "recent_window": window, "sink_tokens": 1}} if window else {}
    engine = Engine(tiny_llama(), Config.from_dict(kv))
    prompt = torch.tensor([5, 9, 3, 7, 1, 4, 8, 8, 2, 6])
    ref, spec = SequenceCache(4), SequenceCache(4, margin=4)
    logits, _ = prefill(engine, prompt, ref)
    prefill(engine, prompt, spec)
    good = [int(logits.argmax())]
    for _ in range(2):
        logits, _ = decode_one_token(engine, torch.tensor(good[-1:]), [ref])
        good.append(int(logits.argmax()))
    # Verify [t0, t1, t2, wrong, wrong]: accepts t1, t2, then its own next token at row 2.
    draft = good[1:3] + [(good[2] + 1) % 99, 11]
    n = spec.length
    out, _ = engine.run(torch.tensor(good[:1] + draft), torch.arange(n, n + 5), [(0, 5)], [spec])
    accepted, nxt = accept_greedy(out, draft)
    assert accepted == 2
    spec.truncate(n + 1 + accepted)
    # The plain path feeds t2 to get the next token; both caches now hold the same positions.
    logits, _ = decode_one_token(engine, torch.tensor(good[2:3]), [ref])
    assert nxt == int(logits.argmax())
    a, _ = decode_one_token(engine, torch.tensor([nxt]), [ref])
    b, _ = decode_one_token(engine, torch.tensor([nxt]), [spec])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for layer in range(4):
        ka, kb = ref.get(layer), spec.get(layer)
        both = torch.isin(kb.pos, ka.pos)  # the margin keeps a few more old entries: compare what both hold
        assert torch.equal(kb.pos[both], ka.pos) and torch.allclose(kb.k[both], ka.k, atol=1e-6)
        assert bool(torch.isin(ka.pos, kb.pos).all())


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.mark.parametrize("deterministic", [False, True])
def test_speculative_sampling_rule_gives_the_target_joint_distribution(deterministic):
    """Two emitted tokens over many trials against the target's exact joint distribution."""
    g = torch.Generator().manual_seed(3)
    V = 4
    p1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)  # target: first token
    p2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)  # target: second given first
    q1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)  # draft, deliberately different
    q2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    p3 = torch.full((V,), 1.0 / V)
    exact = p1[:, None] * p2
    counts = torch.zeros(V, V)
    rng = torch.Generator().manual_seed(4)
    trials = 6000
    for _ in range(trials):
        if deterministic:  # a fixed proposal (like prompt lookup): q one-hot
            d0 = 2
            d1 = int(q2[d0].argmax())
            q = None
        else:
            d0 = int(torch.multinomial(q1, 1, generator=rng))
            d1 = int(torch.multinomial(q2[d0], 1, generator=rng))
            q = torch.stack([q1, q2[d0]])
        n, nxt = accept_sampled(torch.stack([p1, p2[d0], p3]), [d0, d1], q, rng)
        if n >= 2:
            first, second = d0, d1
        elif n == 1:
            first, second = d0, nxt
        else:  # rejected at once: the next step samples the second token from the target
            first, second = nxt, int(torch.multinomial(p2[nxt], 1, generator=rng))
        counts[first, second] += 1
    assert _tv(counts.flatten() / trials, exact.flatten()) < 0.035
    draft_joint = q1[:, None] * q2
    assert _tv(draft_joint.flatten(), exact.flatten()) > 0.15  # the draft alone would fail this test


def test_sampled_generation_follows_the_full_model_distribution():
    """End to end on a tiny model: many rows sample two tokens with a poor draft (layers skipped)."""
    model = tiny_llama(seed=2)
    prompt = torch.tensor([3, 14, 15, 92, 65])
    top_k, rows = 4, 500
    probs = make_probs(1.0, top_k)
    full = Engine(model, Config())
    p1 = probs(full(prompt).logits[-1:])[0]
    exact2 = torch.zeros(99)
    for t in p1.nonzero().flatten().tolist():
        exact2 += p1[t] * probs(full(torch.cat([prompt, torch.tensor([t])])).logits[-1:])[0]
    engine = Engine(model, Config.from_dict({"speculative": _spec("skip", skip_layers=[1, 2], initial_draft=3)}))
    r = generate(engine, [prompt] * rows, 3, temperature=1.0, top_k=top_k, seed=5)
    first = torch.bincount(torch.tensor([t[0] for t in r.tokens]), minlength=99) / rows
    second = torch.bincount(torch.tensor([t[1] for t in r.tokens]), minlength=99) / rows
    assert r.speculative["sources"]["skip"]["drafted"] > 0
    q1 = probs(draft_engine(engine, "skip")(prompt).logits[-1:])[0]
    assert _tv(q1, p1) > 0.2  # the draft alone would fail this test
    # Sampling noise of 500 draws: TV about 0.03 (first, 4 outcomes) and 0.05 (second, 16).
    assert _tv(first, p1) < 0.07 and _tv(second, exact2) < 0.1


def test_prompt_lookup_finds_the_most_recent_longest_match():
    lookup = PromptLookup(min_ngram=1, max_ngram=3)
    ctx = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 7, 1, 2, 3]
    assert lookup.lookup(0, ctx, 3) == [4, 5, 7]  # "1 2 3" last seen before "4 5 7"
    assert lookup.lookup(1, [5, 6, 7], 3) == []
    ctx += [4, 5, 7, 1]
    assert lookup.lookup(0, ctx, 2) == [2, 3]  # the index grows with the text


def test_config_section_set_and_errors():
    cfg = Config.preset("lossless")
    assert cfg.speculative.enabled and cfg.is_off  # lossless: every mechanism still off
    cfg = Config().with_settings(["speculative.sources=lookup,int4", "speculative.max_draft=6"])
    assert cfg.speculative.enabled and cfg.speculative.source_list == ["lookup", "int4"]
    assert Config.from_dict(cfg.to_dict()).speculative == cfg.speculative
    engine = Engine(tiny_llama(), cfg)  # float32 on a CPU: the int4 draft would cost more than it saves
    assert usable_sources(engine) == ["lookup"]
    assert usable_sources(Engine(tiny_llama(), Config().with_settings(["speculative.sources=int4"]))) == ["int4"]
    assert Config.from_dict({"speculative": {"sources": ["skip"], "skip_layers": [2, 1]}}).speculative.skip_layers == [1, 2]
    for bad in ({"sources": "lookup,gpu"}, {"sources": ""}, {"max_draft": 0}, {"initial_draft": 0}, {"confidence": 2.0}):
        with pytest.raises(QuicksilverError):
            Config.from_dict({"speculative": bad})
    with pytest.raises(QuicksilverError):
        generate(Engine(tiny_llama(), Config.from_dict({"speculative": {"enabled": True, "sources": "skip", "skip_layers": [7]}})), 
            [torch.tensor([1, 2])], 2)


def test_shared_model_draft_leaves_the_verifier_cache_as_it_found_it():
    engine = Engine(tiny_llama(), Config())
    prompt = torch.tensor([5, 9, 3, 7, 1, 4, 8])
    cache = SequenceCache(4)
    prefill(engine, prompt[:-1], cache)  # the verifier's cache holds every position but the last token's
    before = [cache.get(layer).k.clone() for layer in range(4)]
    src = ModelDraft("skip", draft_engine(engine, "skip"), 0.0, 4)
    (d,) = src.propose([0], [prompt.tolist()], [3], [cache])
    assert len(d.tokens) == 3 and d.passes == 3
    assert cache.length == prompt.numel() - 1
    for layer in range(4):
        assert torch.equal(cache.get(layer).k, before[layer])


def test_draft_length_follows_acceptance_and_costs():
    assert best_length(1.0, 0.03, 16)[0] == 16  # always accepted, cheap rows: draft all the way
    assert best_length(0.5, 0.03, 16)[0] < best_length(0.9, 0.03, 16)[0]
    assert best_length(0.9, 0.7, 16)[0] < best_length(0.9, 0.03, 16)[0]  # a costly draft pass: shorter
    assert best_length(0.3, 0.7, 16)[1] < 1.0  # does not pay: the policy switches it off


def test_model_drafts_left_out_of_cpu_batches_when_lookup_is_configured():
    engine = Engine(tiny_llama().to(torch.bfloat16), Config.preset("lossless"))
    assert usable_sources(engine, 1) == ["lookup", "int8"] and usable_sources(engine, 8) == ["lookup"]


def test_batch_mixing_plain_steps_and_verify_passes_equals_plain_decoding():
    """float32, batch: pooled one-token steps, verify passes, rows with and without drafts side by side."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(7)
    loop = torch.randint(0, 99, (6,), generator=g)
    prompts = [torch.cat([loop] * 4), torch.randint(0, 99, (11,), generator=g), torch.tensor([4, 4, 4, 4, 4, 4]),
               torch.randint(0, 99, (5,), generator=g)]
    ref = generate(Engine(model, Config()), prompts, 24)
    r = generate(Engine(model, Config.from_dict({"speculative": _spec("lookup")})), prompts, 24)
    assert r.tokens == ref.tokens
    s = r.speculative
    # The first step verifies every draft (a repeating prompt has one, a random one none), the
    # next draft-free step is the pooled one-token step of plain decoding.
    assert s["verify_passes"] >= 1 and s["plain_passes"] >= 1 and s["undrafted_rows_in_verify"] >= 1


def test_drafts_are_verified_only_where_they_pay_for_leaving_the_pooled_step():
    costs = StepCosts()
    assert choose_drafts([(0, 4, 1.0)], 8, costs, pooled=True) == [0]  # nothing measured: verify first
    for rows in (12, 20, 40, 16, 28):
        costs.add_verify(8, rows, 0.016 + 0.001 * rows)  # a ragged pass: 16 ms plus 1 ms per row
    assert choose_drafts([(0, 4, 1.0)], 8, costs, pooled=True) == []  # then the pooled step, to measure it
    costs.add_plain(8, 0.0125)  # the pooled step: 12.5 ms for 8 tokens
    assert abs(costs.verify_time(8, 24) - 0.040) < 1e-9 and abs(costs.row_cost(8) - 0.64) < 1e-9
    # One short, likely draft does not pay for the ragged pass; long sure drafts on every row do.
    assert choose_drafts([(0, 4, 1.0), (3, 2, 0.5)], 8, costs, pooled=True) == []
    sure = [(i, 16, 15.5) for i in range(8)]
    assert sorted(choose_drafts(sure + [(9, 4, 0.2)], 8, costs, pooled=True)) == list(range(8))
    assert expected_accepted(0.5, 2) == 0.75 and expected_accepted(1.0, 5) == 5.0


def test_pooled_verify_pass_equals_the_per_sequence_path():
    """Engine level, float32: a ragged pass over rows of one pool (one write and one attention call
    per layer) gives the logits and cache entries of the per-sequence path."""
    from quicksilver.decoding import new_caches, prefill_batch

    engine = Engine(tiny_llama(), Config())
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 99, (n,), generator=g) for n in (7, 3, 12)]
    pooled = new_caches(engine, [n + 10 for n in (7, 3, 12)])
    own = [SequenceCache(4) for _ in prompts]
    prefill_batch(engine, prompts, pooled)
    prefill_batch(engine, prompts, own)
    lens = (3, 1, 5)  # a draft of 2, no draft, a draft of 4
    ids = torch.randint(0, 99, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(p.numel(), p.numel() + m) for p, m in zip(prompts, lens)])
    ends = torch.tensor(lens).cumsum(0).tolist()
    segments = [(e - m, e) for e, m in zip(ends, lens)]
    a, _ = engine.run(ids, pos, segments, pooled)
    b, _ = engine.run(ids, pos, segments, own)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert all(c.pool is not None for c in pooled)  # still rows of the pool (not regrown)
    for c, o in zip(pooled, own):
        assert c.length == o.length
        for layer in range(4):
            x, y = c.get(layer), o.get(layer)
            assert torch.equal(x.pos, y.pos) and torch.allclose(x.k, y.k, atol=1e-6) and torch.allclose(x.v, y.v, atol=1e-6)
