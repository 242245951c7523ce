"""Draft sources of speculative decoding, each behind one small interface (``DraftSource``).

Drafts come from the same frozen model: prompt lookup (n-gram matches in the text so far),
a low-bit copy of the same weights, or the engine with layers skipped (``ModelDraft``, which
runs a cheaper ``Engine`` of the verifier's own class over the same model). The decoding loop
only drafts, verifies and accepts; it never knows which source drafted.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
import torch

from ...cache import SequenceCache
from ...config import Config
from ...errors import QuicksilverError
from ...ledger import Ledger



@dataclass
class Draft:
    """Drafted tokens for one sequence, and the probabilities they were sampled from (None: deterministic)."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    passes: int = 0  # draft-model passes spent on this sequence (a model draft may spend one and draft nothing)


class DraftSource:
    """One way of drafting: ``propose`` continuations for some sequences, learn from ``update``.

    The verifier never knows which source drafted (HF's ``CandidateGenerator`` keeps draft
    sources apart from the loop the same way). ``rows`` are the sequences' ids (stable while a
    sequence lives), ``contexts[i]`` sequence i's whole text so far (prompt and generated
    tokens); ``caches[i]`` the verifier's cache of that sequence, holding every position but the
    last token's (a source may write past it, and must leave it as it found it);
    ``samplers[i]`` the sequence's ``Sampler`` (None: every sequence greedy): a sampled
    sequence's draft is drawn from its own distribution with its own generator.
    """

    name = "?"
    runs_passes = False  # drafts with engine passes of its own (a model draft), whose time it must win back

    def propose(self, rows: list[int], contexts: list[list[int]], lengths: list[int],
                caches: list[SequenceCache] | None = None, samplers: list | None = None) -> list[Draft]:
        raise NotImplementedError

    def update(self, row: int, num_accepted: int) -> None:  # noqa: B027 - optional hook
        """Called after verification with how many of the row's drafted tokens were accepted."""

    def forget(self, row: int) -> None:  # noqa: B027 - optional hook
        """The sequence ``row`` left the batch: drop what was kept for it."""


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

    def propose(self, rows, contexts, lengths, caches=None, samplers=None):
        return [Draft(self.lookup(r, c, k)) for r, c, k in zip(rows, contexts, lengths)]

    def forget(self, row):
        self._index.pop(row, None)
        self._done.pop(row, None)


class ModelDraft(DraftSource):
    """Drafts from a cheaper engine over the same model (low-bit weights, or layers skipped).

    ``shared`` (the default whenever KV skipping is off): the draft keeps no cache of its own.
    It reads the verifier's cache, whose prefix is the full model's exact K/V, writes only its
    drafted tokens' K/V behind it, and truncates them away before the verify pass rewrites
    those positions. No draft prefill, no second cache, and a draft that sees the full model's
    prefix agrees with it more often. Each draft pass is one token for every sequence still
    drafting; a sequence stops before a token whose draft probability is under ``confidence``.

    Not shared (KV skipping on: a draft pass must not change what an eviction rule keeps in
    the verifier's cache): each sequence has its own draft cache, and a proposal first feeds
    the draft engine what it has not seen of the text (after rolling its cache back to the
    longest prefix it shares with the text).
    """

    runs_passes = True

    def __init__(self, name: str, engine, confidence: float, margin: int, shared: bool = True):
        self.name, self.engine, self.confidence = name, engine, confidence
        self.margin, self.shared = margin, shared
        self._samplers: list | None = None  # the proposing sequences' samplers, during ``propose``
        self._caches: dict[int, SequenceCache] = {}
        self._fed: dict[int, list[int]] = {}  # the tokens each row's draft cache holds, in order
        self.ledger = Ledger(n_layers=engine.spec.n_layers)
        self.seconds_per_pass: float | None = None  # running average of one draft pass's wall time

    def _pick(self, logits: torch.Tensor, live: list[int]):
        """Tokens, the draft's confidence (its top probability) and, per row, the distribution a
        sampled sequence drew from (None for greedy rows); row j is sequence ``live[j]``.

        The confidence is the top probability, not the sampled token's: a stop that looked at
        the sampled token would make the proposal differ from ``q`` and bias the output.
        """
        top = torch.softmax(logits.float(), dim=-1).max(-1)
        tokens, conf, dists = top.indices.tolist(), top.values.tolist(), [None] * len(live)
        for j, i in enumerate(live):
            s = None if self._samplers is None else self._samplers[i]
            if s is not None and not s.greedy:
                dists[j] = s.probs(logits[j : j + 1])[0].cpu()
                tokens[j] = int(torch.multinomial(dists[j], 1, generator=s.generator))
                conf[j] = float(dists[j].max())
        return tokens, conf, dists

    def _run(self, ids, pos, segments, caches, logit_rows, timed: bool = False):
        t0 = time.perf_counter()
        logits, ledger = self.engine.run(ids, pos, segments, caches, logit_rows)
        self.ledger.merge(ledger)
        if timed:  # one-token passes only: a catch-up pass may be a whole prompt's prefill
            logits = logits.float().cpu()
            took = time.perf_counter() - t0
            self.seconds_per_pass = took if self.seconds_per_pass is None else 0.8 * self.seconds_per_pass + 0.2 * took
        return logits

    def _draft_steps(self, drafts, live, feed, caches, lengths, on_fed=None):
        """One-token draft passes for the sequences ``live`` (feeding ``feed``) until each stops."""
        dev = next(self.engine.model.parameters()).device
        logits = None
        while live:
            cs = [caches[i] for i in live]
            logits = self._run(torch.tensor(feed, device=dev), torch.tensor([c.length for c in cs], device=dev),
                               [(j, j + 1) for j in range(len(live))], cs, None, timed=True)
            if on_fed is not None:
                on_fed(live, feed)
            for i in live:
                drafts[i].passes += 1
            live, feed = self._extend(drafts, live, logits, lengths)

    def _extend(self, drafts, live, logits, lengths):
        """Append each live sequence's next draft token; the sequences (and tokens) that go on."""
        tokens, conf, dist = self._pick(logits, live)
        going = []
        for j, i in enumerate(live):
            if conf[j] < self.confidence:
                continue  # not confident: the verifier decides this token itself
            drafts[i].tokens.append(tokens[j])
            if dist[j] is not None:
                drafts[i].probs.append(dist[j])
            if len(drafts[i].tokens) < lengths[i]:
                going.append((i, tokens[j]))
        return [i for i, _ in going], [t for _, t in going]

    def propose(self, rows, contexts, lengths, caches=None, samplers=None):
        drafts = [Draft([], [] if samplers is not None and not samplers[i].greedy else None) for i in range(len(rows))]
        self._samplers = samplers
        if self.shared and caches is not None:
            base = [c.length for c in caches]
            try:
                self._draft_steps(drafts, list(range(len(rows))), [ctx[-1] for ctx in contexts], caches, lengths)
            finally:  # the verify pass writes these positions itself
                for c, b in zip(caches, base):
                    c.truncate(b)
        else:
            self._propose_own(rows, contexts, lengths, drafts)
        for d in drafts:
            if d.probs is not None:
                d.probs = torch.stack(d.probs) if d.probs else None
        return drafts

    def _propose_own(self, rows, contexts, lengths, drafts):
        dev = next(self.engine.model.parameters()).device
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
        for d in drafts:
            d.passes += 1
        live, feed = self._extend(drafts, list(range(len(rows))), logits, lengths)

        def fed(live, feed):
            for i, t in zip(live, feed):
                self._fed[rows[i]].append(t)

        self._draft_steps(drafts, live, feed, caches, lengths, on_fed=fed)

    def forget(self, row):
        self._caches.pop(row, None)
        self._fed.pop(row, None)

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
    per_engine = _DRAFT_ENGINES.setdefault(engine, {})
    if source not in per_engine:
        cfg = draft_config(engine.config, source, engine.spec.n_layers)
        amq = cfg.amq
        if source == "int4" and (engine.spec.d_model % amq.group_size or engine.spec.d_ff % amq.group_size):
            cfg.amq.group_size = None
        if engine.spec.vocab_size % 16:  # the CPU low-bit kernels pack output rows by 16
            cfg.amq.head_bits = None
        per_engine[source] = type(engine)(engine.model, cfg)  # the verifier's own class: no import of the engine
    return per_engine[source]


# On a CPU, from this many sequences a draft pass of the low-bit weights costs about what a
# plain step does (at 8 rows the int8 kernels are no faster than bfloat16: docs/RESULTS.md,
# kernel table), and the measured bfloat16 batch-8 run had every model draft at 0.5-0.6x HF.
CPU_MODEL_DRAFT_MAX_BATCH = 4


def usable_sources(engine, batch: int = 1) -> list[str]:
    """The configured sources this engine can profit from at ``batch`` sequences.

    On a CPU the weight-only low-bit kernels are fast for bfloat16 activations only: for a
    float32 model an int8/int4 draft costs more than a full step (and choosing its kernels
    means measuring slow candidates at first use), so it is left out when another source is
    configured; so are they from ``CPU_MODEL_DRAFT_MAX_BATCH`` sequences on. Alone,
    a source still runs (and its measured cost switches it off).
    """
    names = engine.config.speculative.source_list
    weight = next(engine.model.parameters())
    if weight.device.type == "cpu" and (weight.dtype == torch.float32 or batch >= CPU_MODEL_DRAFT_MAX_BATCH):
        kept = [n for n in names if n not in ("int8", "int4")]
        if kept:
            return kept
    return names


def make_sources(engine, batch: int = 1) -> list[DraftSource]:
    """The draft sources of the engine's configuration that pay at ``batch`` sequences (``usable_sources``)."""
    cfg = engine.config.speculative
    out: list[DraftSource] = []
    for name in usable_sources(engine, batch):
        if name == "lookup":
            out.append(PromptLookup(cfg.lookup_min_ngram, cfg.lookup_max_ngram))
        else:
            out.append(ModelDraft(name, draft_engine(engine, name), cfg.confidence, cfg.max_draft,
                                  shared=not engine.config.kv.enabled))
    return out
