"""Lossless speculative decoding: cheap drafts from the same frozen model, verified by the engine.

Every step, each sequence of the batch may get a draft of a few tokens from one draft source
(``DraftSource``: prompt lookup, a low-bit copy of the same weights, or the engine with layers
skipped). The verifier, the engine with its own configuration, then runs one forward over
[last token, draft...] for every sequence at once (one segment per sequence, each with its own
cache), keeps the longest accepted prefix plus one token of its own, and rolls each cache
back to what it accepted (``SequenceCache.truncate``). Greedy: a drafted token is accepted when
it is the verifier's argmax, so the output equals decoding one token at a time. Sampling:
speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept a drafted token d with
probability min(1, p(d)/q(d)), else resample from max(p - q, 0) normalized, so every emitted
token follows the verifier's distribution p. A deterministic draft (lookup, or greedy model
drafts) has q = one-hot.

Drafting adapts per sequence and source: the draft length follows the acceptance (+2 after a
fully accepted draft, -1 after a rejection), a model draft stops before a token it is not
confident about, and a source is switched off for a sequence for a while (doubling each time)
when its acceptance there falls under ``off_below`` or, for a model draft, when its measured
cost outweighs what it gains: the tokens a step emits against the verify pass's time plus the
draft passes' time, both measured as they run. So drafting gets out of the way where it
does not pay (a float32 int8 draft on a CPU whose int8 kernel is slower than float32, say).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cache import SequenceCache
from .config import Config
from .errors import QuicksilverError
from .generate import GenerationResult, _check_prompts, prefill_batch
from .ledger import Ledger


# ---------------------------------------------------------------------------------------------
# Acceptance rules (pure functions on tensors)


def accept_greedy(target_logits: torch.Tensor, draft: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: (number of drafted tokens accepted, the verifier's next token).

    ``target_logits`` (k+1, V): row i is the verifier's prediction after the i-th drafted token
    (row 0: after the last accepted token).
    """
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampled(p: torch.Tensor, draft: Sequence[int], q: torch.Tensor | None, generator: torch.Generator) -> tuple[int, int]:
    """Speculative sampling: (number of drafted tokens accepted, the next token), exact in distribution.

    Parameters
    ----------
    p : (k+1, V) the verifier's probabilities at each drafted position and one past them.
    draft : k drafted tokens.
    q : (k, V) the draft's probabilities the tokens were sampled from; None: a deterministic
        draft (q is one-hot on the drafted token).
    generator : CPU generator for the uniforms and the resampling.
    """
    k = len(draft)
    p = p.float().cpu()
    u = torch.rand(k, generator=generator) if k else None
    for i, d in enumerate(draft):
        q_d = 1.0 if q is None else float(q[i, d])
        p_d = float(p[i, d])
        if q_d > 0 and float(u[i]) < min(1.0, p_d / q_d):
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i].float().cpu()).clamp_min(0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(dist, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def make_probs(temperature: float, top_k: int | None = None, top_p: float | None = None):
    """logits (N, V) -> the sampling distribution (N, V) that ``generate.make_sampler`` samples from."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return lambda logits: torch.softmax(warpers(None, logits.float()), dim=-1)


# ---------------------------------------------------------------------------------------------
# Draft sources


@dataclass
class Draft:
    """Drafted tokens for one sequence, and the probabilities they were sampled from (None: deterministic)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class DraftSource:
    """One way of drafting: ``propose`` continuations for some sequences, learn from ``update``.

    The verifier never knows which source drafted. ``contexts[i]`` is sequence i's whole text
    so far (prompt and generated tokens).
    """

    name = "?"

    def propose(self, rows: list[int], contexts: list[list[int]], lengths: list[int]) -> list[Draft]:
        raise NotImplementedError

    def update(self, row: int, num_accepted: int) -> None:  # noqa: B027 - optional hook
        """Called after verification with how many of the row's drafted tokens were accepted."""


class PromptLookup(DraftSource):
    """n-gram match: the tokens that followed the most recent earlier occurrence of the text's suffix.

    Each sequence keeps an index (n-gram -> where its continuation starts), extended as the
    text grows, so a lookup costs a few dictionary probes.
    """

    name = "lookup"

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4):
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self._index: dict[int, dict[tuple, int]] = {}
        self._done: dict[int, int] = {}  # continuation starts indexed so far, per row

    def _extend(self, row: int, ctx: list[int]) -> dict:
        index = self._index.setdefault(row, {})
        start = self._done.get(row, 1)
        # Continuations must be non-empty: index every n-gram ending before the last token.
        for j in range(start, len(ctx)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if j >= n:
                    index[tuple(ctx[j - n : j])] = j  # later occurrences overwrite: the most recent wins
        self._done[row] = len(ctx)
        return index

    def lookup(self, row: int, ctx: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        index = self._extend(row, ctx[:-1]) if len(ctx) > 1 else {}
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ctx) > n:
                j = index.get(tuple(ctx[-n:]))
                if j is not None:
                    return ctx[j : j + k]
        return []

    def propose(self, rows, contexts, lengths):
        return [Draft(self.lookup(r, c, k)) for r, c, k in zip(rows, contexts, lengths)]


class ModelDraft(DraftSource):
    """Drafts from a cheaper engine over the same model (low-bit weights, or layers skipped).

    Each sequence has its own draft cache. A proposal first feeds the draft engine what it has
    not seen of the text (after rolling its cache back to the longest prefix it shares with the
    text), all sequences in one pass, then one token per step for the sequences still drafting.
    A sequence stops drafting before a token whose draft probability is under ``confidence``.
    """

    def __init__(self, name: str, engine, confidence: float, margin: int, probs: Callable | None, generator):
        self.name, self.engine, self.confidence = name, engine, confidence
        self.margin, self.probs, self.generator = margin, probs, generator
        self._caches: dict[int, SequenceCache] = {}
        self._fed: dict[int, list[int]] = {}  # the tokens each row's draft cache holds, in order
        self.ledger = Ledger(n_layers=engine.spec.n_layers)
        self.seconds_per_pass: float | None = None  # running average of one draft pass's wall time

    def _pick(self, logits: torch.Tensor):
        """Tokens, the draft's confidence (its top probability) and the distributions (sampling).

        The confidence is the top probability, not the sampled token's: a stop that looked at
        the sampled token would make the proposal differ from ``q`` and bias the output.
        """
        if self.probs is None:
            top = torch.softmax(logits.float(), dim=-1).max(-1)
            return top.indices.tolist(), top.values.tolist(), None
        dist = self.probs(logits).cpu()
        tokens = torch.multinomial(dist, 1, generator=self.generator).squeeze(1)
        return tokens.tolist(), dist.max(-1).values.tolist(), dist

    def _run(self, ids, pos, segments, caches, logit_rows, timed: bool = False):
        t0 = time.perf_counter()
        logits, ledger = self.engine.run(ids, pos, segments, caches, logit_rows)
        self.ledger.merge(ledger)
        if timed:  # one-token passes only: a catch-up pass may be a whole prompt's prefill
            logits = logits.float().cpu()
            took = time.perf_counter() - t0
            self.seconds_per_pass = took if self.seconds_per_pass is None else 0.8 * self.seconds_per_pass + 0.2 * took
        return logits

    def propose(self, rows, contexts, lengths):
        dev = next(self.engine.model.parameters()).device
        drafts = [Draft([], [] if self.probs is not None else None) for _ in rows]
        ids, pos, segments, caches = [], [], [], []
        for r, ctx in zip(rows, contexts):
            cache = self._caches.get(r)
            if cache is None:
                cache = self._caches[r] = SequenceCache(self.engine.spec.n_layers, margin=self.margin)
            fed = self._fed.setdefault(r, [])
            m = 0
            limit = min(len(fed), len(ctx) - 1)  # feed at least the last token, to get its logits
            while m < limit and fed[m] == ctx[m]:
                m += 1
            if m < cache.length:
                cache.truncate(m)
            del fed[m:]
            chunk = ctx[m:]
            start = len(ids)
            ids += chunk
            pos += range(m, len(ctx))
            segments.append((start, len(ids)))
            caches.append(cache)
            fed += chunk
        ids_t = torch.tensor(ids, device=dev)
        logits = self._run(ids_t, torch.tensor(pos, device=dev), segments, caches,
                           torch.tensor([b - 1 for _, b in segments], device=dev))
        live = list(range(len(rows)))
        while live:
            tokens, conf, dist = self._pick(logits)
            going = []
            for j, i in enumerate(live):
                if conf[j] < self.confidence:
                    continue  # not confident: the verifier decides this token itself
                drafts[i].tokens.append(tokens[j])
                if dist is not None:
                    drafts[i].probs.append(dist[j])
                if len(drafts[i].tokens) < lengths[i]:
                    going.append((i, tokens[j]))
            if not going:
                break
            live = [i for i, _ in going]
            feed = [t for _, t in going]
            cs = [caches[i] for i in live]
            logits = self._run(torch.tensor(feed, device=dev), torch.tensor([c.length for c in cs], device=dev),
                               [(j, j + 1) for j in range(len(live))], cs, None, timed=True)
            for i, t in going:
                self._fed[rows[i]].append(t)
        for d in drafts:
            if d.probs is not None:
                d.probs = torch.stack(d.probs) if d.probs else None
        return drafts

    def peak_bytes(self) -> int:
        return sum(c.peak_bytes for c in self._caches.values())


_DRAFT_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def draft_config(config: Config, source: str, n_layers: int) -> Config:
    """The cheap configuration a model draft source runs: the verifier's, with its cheap change."""
    data = config.to_dict()
    data["speculative"] = {"enabled": False}
    data["fusion"] = {"enabled": False}
    if source == "int8":
        data["amq"] = {"enabled": True, "uniform_bits": 8, "head_bits": 8}
    elif source == "int4":
        data["amq"] = {"enabled": True, "uniform_bits": 4, "group_size": 32, "head_bits": 8}
    elif source == "skip":
        # Static depth reduction through halting: every token halts at once (threshold 2 on a
        # relative drift) and skips exactly the listed layers.
        data["halting"] = {"enabled": True, "threshold": 2.0, "min_layer": 1, "patience": 1, "protect_first": 0,
                           "tail_layers": 0, "skip": "layer", "skippable_layers": config.speculative.layers_to_skip(n_layers)}
    else:
        raise QuicksilverError(f"{source!r} is not a model draft source")
    return Config.from_dict({**data, "name": f"draft-{source}"})


def draft_engine(engine, source: str):
    """The draft engine of ``source`` for ``engine`` (built once per engine: quantizing takes a moment)."""
    from .engine import Engine

    per_engine = _DRAFT_ENGINES.setdefault(engine, {})
    if source not in per_engine:
        cfg = draft_config(engine.config, source, engine.spec.n_layers)
        amq = cfg.amq
        if source == "int4" and (engine.spec.d_model % amq.group_size or engine.spec.d_ff % amq.group_size):
            cfg.amq.group_size = None
        if engine.spec.vocab_size % 16:  # the CPU low-bit kernels pack output rows by 16
            cfg.amq.head_bits = None
        per_engine[source] = Engine(engine.model, cfg)
    return per_engine[source]


# ---------------------------------------------------------------------------------------------
# Per-sequence adaptive policy and statistics


@dataclass
class SourceStats:
    """What one source did: steps it drafted in, tokens drafted, tokens accepted, tokens emitted by its steps."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "tokens_per_step": self.emitted / self.steps if self.steps else 0.0}


@dataclass
class _RowPolicy:
    """One sequence's draft length, running acceptance and off-switch for one source."""

    length: int
    acceptance: float = 1.0
    gain: float | None = None  # running estimate of tokens per unit of plain-step time (model drafts)
    off_until: int = 0
    backoff: int = 0


@dataclass
class SpeculativeResult(GenerationResult):
    """``GenerationResult`` plus what speculation did (``speculative``: per source and overall)."""

    speculative: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The decoding loop


def usable_sources(engine) -> list[str]:
    """The configured sources this engine can profit from.

    On a CPU the weight-only low-bit kernels are fast for bfloat16 activations only: for a
    float32 model an int8/int4 draft costs more than a full step (and choosing its kernels
    means measuring slow candidates at first use), so it is left out when another source is
    configured. Alone, it still runs (and its measured cost switches it off).
    """
    names = engine.config.speculative.source_list
    weight = next(engine.model.parameters())
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        kept = [n for n in names if n not in ("int8", "int4")]
        if kept:
            return kept
    return names


def make_sources(engine, temperature: float, top_k, top_p, generator) -> list[DraftSource]:
    cfg = engine.config.speculative
    probs = make_probs(temperature, top_k, top_p) if temperature > 0 else None
    out: list[DraftSource] = []
    for name in usable_sources(engine):
        if name == "lookup":
            out.append(PromptLookup(cfg.lookup_min_ngram, cfg.lookup_max_ngram))
        else:
            out.append(ModelDraft(name, draft_engine(engine, name), cfg.confidence, cfg.max_draft, probs, generator))
    return out


@torch.inference_mode()
def generate_speculative(
    engine,
    prompts,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
    sources: list[DraftSource] | None = None,
) -> SpeculativeResult:
    """``quicksilver.generate.generate`` with speculative decoding (``engine.config.speculative``).

    Same parameters and result, plus ``sources`` (default: built from the config) and the
    result's ``speculative`` statistics: verify steps, tokens per verify step, and per source
    the steps it drafted in, tokens drafted and accepted, and its acceptance rate.
    """
    from .generate import make_sampler

    spec, cfg = engine.spec, engine.config.speculative
    cfg.check_model(spec.n_layers)
    rows = _check_prompts(prompts, max_new_tokens, spec.max_positions)
    if stop_strings and tokenizer is None:
        raise QuicksilverError("stop strings need a tokenizer to decode with")
    make_sampler(temperature, top_k, top_p, seed)  # validates the sampling settings like plain generate
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)
    sampling = temperature > 0
    probs_of = make_probs(temperature, top_k, top_p) if sampling else None
    sources = sources if sources is not None else make_sources(engine, temperature, top_k, top_p, gen)
    device = next(engine.model.parameters()).device
    K = cfg.max_draft
    caches = [SequenceCache(spec.n_layers, capacity=r.numel() + max_new_tokens + K + 1, margin=K) for r in rows]
    contexts = [r.tolist() for r in rows]
    out: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    policy = [{s.name: _RowPolicy(cfg.initial_draft) for s in sources} for _ in rows]
    stats = {s.name: SourceStats() for s in sources}
    plain = SourceStats()  # steps where a sequence had no draft
    decode_ledger = Ledger(n_layers=spec.n_layers)
    total = Ledger(n_layers=spec.n_layers)
    verify_s = None  # running average of a verify pass's wall time
    by_name = {s.name: s for s in sources}

    def emit(i: int, tok: int) -> bool:
        """Append a token to row i; True when the row is finished."""
        out[i].append(tok)
        contexts[i].append(tok)
        if on_token:
            on_token(i, tok)
        if tok in eos:
            reasons[i] = "eos"
            return True
        if stop_strings and any(s in tokenizer.decode(out[i]) for s in stop_strings):
            reasons[i] = "stop_string"
            return True
        return len(out[i]) >= max_new_tokens

    t0 = time.perf_counter()
    logits, ledger = prefill_batch(engine, [r.to(device) for r in rows], caches)
    total.merge(ledger)
    first = [accept_sampled(probs_of(logits[j : j + 1]), [], None, gen)[1] for j in range(len(rows))] if sampling \
        else logits.argmax(-1).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    active = [i for i in range(len(rows)) if not emit(i, first[i])]
    step = 0
    while active:
        step += 1
        # 1. Drafts: each row asks its sources in order of preference.
        drafts: dict[int, tuple[str, Draft]] = {}
        waiting = list(active)
        for src in sources:
            asking = []
            for i in waiting:
                pol = policy[i][src.name]
                room = max_new_tokens - len(out[i]) - 1  # the verifier adds one token of its own
                if pol.off_until <= step and room > 0:
                    asking.append((i, min(pol.length, room)))
            if not asking:
                continue
            proposals = src.propose([i for i, _ in asking], [contexts[i] for i, _ in asking], [k for _, k in asking])
            for (i, _), d in zip(asking, proposals):
                if d.tokens:
                    drafts[i] = (src.name, d)
            waiting = [i for i in waiting if i not in drafts]
        # 2. One verify pass over [last token, draft...] of every active row.
        ids, pos, segments = [], [], []
        for i in active:
            toks = [contexts[i][-1]] + (drafts[i][1].tokens if i in drafts else [])
            start = len(ids)
            ids += toks
            pos += range(caches[i].length, caches[i].length + len(toks))
            segments.append((start, len(ids)))
        tv = time.perf_counter()
        logits, ledger = engine.run(torch.tensor(ids, device=device), torch.tensor(pos, device=device), segments,
                                    [caches[i] for i in active])
        logits = logits.float()
        took = time.perf_counter() - tv
        verify_s = took if verify_s is None else 0.8 * verify_s + 0.2 * took
        decode_ledger.merge(ledger)
        total.merge(ledger)
        # 3. Accept, emit, roll back, adapt.
        still = []
        for (a, b), i in zip(segments, active):
            name, d = drafts.get(i, (None, Draft([])))
            base = caches[i].length - (b - a)  # the cache length before this step
            if sampling:
                n, nxt = accept_sampled(probs_of(logits[a:b]), d.tokens, d.probs, gen)
            else:
                n, nxt = accept_greedy(logits[a:b], d.tokens)
            caches[i].truncate(base + 1 + n)
            done = False
            emitted = 0
            for tok in d.tokens[:n] + [nxt]:
                emitted += 1
                if emit(i, tok):
                    done = True
                    break
            s = stats[name] if name else plain
            s.steps += 1
            s.drafted += len(d.tokens)
            s.accepted += n
            s.emitted += emitted
            if name:
                src = by_name[name]
                # A model draft of d tokens took about d draft passes; a plain step, one verify pass.
                cost = None
                if isinstance(src, ModelDraft) and src.seconds_per_pass and verify_s:
                    cost = 1.0 + len(d.tokens) * src.seconds_per_pass / verify_s
                _adapt(policy[i][name], len(d.tokens), n, step, cfg, cost)
                src.update(i, n)
            if not done:
                still.append(i)
        active = still
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    elem = next(engine.model.parameters()).element_size()
    full_bytes = sum((r.numel() + len(o) - 1) * spec.n_layers * 2 * spec.kv_dim * elem for r, o in zip(rows, out))
    verify_steps = plain.steps + sum(s.steps for s in stats.values())
    emitted = plain.emitted + sum(s.emitted for s in stats.values())
    drafted = sum(s.drafted for s in stats.values())
    accepted = sum(s.accepted for s in stats.values())
    summary = {
        "verify_steps": verify_steps,
        "tokens_per_step": emitted / verify_steps if verify_steps else 0.0,
        "drafted": drafted, "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "sources": {name: s.as_dict() for name, s in stats.items()},
        "undrafted_steps": plain.steps,
        "draft_flops": sum(s.ledger.total_flops for s in sources if isinstance(s, ModelDraft)),
    }
    return SpeculativeResult(
        tokens=out,
        prompt_tokens=[r.numel() for r in rows],
        stop_reasons=reasons,
        time_to_first_token=ttft,
        decode_seconds=end - t1,
        total_seconds=end - t0,
        kv_bytes=sum(c.peak_bytes for c in caches),
        kv_full_bytes=full_bytes,
        mean_exit_layer=decode_ledger.as_dict()["mean_exit_layer"] if decode_ledger.tokens else float(spec.n_layers),
        ledger=total.as_dict(),
        speculative=summary,
    )


def _adapt(pol: _RowPolicy, drafted: int, accepted: int, step: int, cfg, cost: float | None = None) -> None:
    """Draft length follows acceptance; a source that keeps failing (or costs more than it gains) backs off.

    ``cost``: the step's time in units of a plain one-token step (model drafts), None: not measured.
    """
    if accepted == drafted:
        pol.length = min(cfg.max_draft, pol.length + 2)
    else:
        pol.length = max(1, pol.length - 1)
    pol.acceptance = 0.7 * pol.acceptance + 0.3 * (accepted / drafted)
    if cost is not None:
        now = (accepted + 1) / cost
        pol.gain = now if pol.gain is None else 0.7 * pol.gain + 0.3 * now
    if pol.acceptance < cfg.off_below or (pol.gain is not None and pol.gain < 1.0):
        pol.backoff = cfg.retry_after if pol.backoff == 0 else 2 * pol.backoff
        pol.off_until = step + pol.backoff
        pol.acceptance, pol.gain = 1.0, None  # a fresh start when it retries
    elif accepted == drafted:
        pol.backoff = 0
