"""Lossless speculative decoding: cheap drafts from the same frozen model, verified by the engine.

Every step, each sequence of the batch may get a draft of a few tokens from one draft source
(``DraftSource``: prompt lookup, a low-bit copy of the same weights, or the engine with layers
skipped). The verifier, the engine with its own configuration, then runs one forward over
[last token, draft...] for every sequence at once (one segment per sequence, each with its own
cache), keeps the longest accepted prefix plus one token of its own, and rolls each cache
back to what it accepted (``SequenceCache.truncate``). The caches are rows of one pool, as in
plain generation, so a step where no sequence has a draft is plain generation's pooled
one-token step; a draft is verified only where its expected tokens pay for its verified rows
and, at a batch, for leaving that pooled step (``choose_drafts``, on measured ``StepCosts``).
Greedy: a drafted token is accepted when it is the verifier's argmax, so the output equals
decoding one token at a time. Sampling:
speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept a drafted token d with
probability min(1, p(d)/q(d)), else resample from max(p - q, 0) normalized, so every emitted
token follows the verifier's distribution p. A deterministic draft (lookup, or greedy model
drafts) has q = one-hot.

Drafting adapts per sequence and source, by measured costs: a plain step's time is averaged
and a verify pass's time is fitted as a + b * rows while the passes run (``StepCosts``), a
model draft's pass is timed, and each sequence keeps decayed counts of accepted and rejected
drafted tokens. From these the draft length that maximises expected tokens per unit of time is
chosen (``best_length``); where no length beats a plain step, or a model draft's realised gain falls under 1, the source is
switched off for that sequence for a while (doubling each time). On a CPU at batch 1 a
verified row costs a few percent of a step (the weights are read once whatever the rows), so
prompt lookup drafts long and stays on; a model draft must win back its own passes, and gets
out of the way where it does not (a float32 int8 draft on a CPU whose int8 kernel is slower
than float32, say). A model draft also stops before a token it is not confident about.
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
from .generate import GenerationResult, _check_request, decode_one_token, new_caches, prefill_batch
from .kernels import argmax
from .ledger import Ledger


# ---------------------------------------------------------------------------------------------
# Acceptance rules (pure functions on tensors)


def accept_greedy(target_logits: torch.Tensor, draft: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: (number of drafted tokens accepted, the verifier's next token).

    ``target_logits`` (k+1, V): row i is the verifier's prediction after the i-th drafted token
    (row 0: after the last accepted token).
    """
    best = argmax(target_logits).tolist()
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
    passes: int = 0  # draft-model passes spent on this sequence (a model draft may spend one and draft nothing)


class DraftSource:
    """One way of drafting: ``propose`` continuations for some sequences, learn from ``update``.

    The verifier never knows which source drafted. ``contexts[i]`` is sequence i's whole text
    so far (prompt and generated tokens); ``caches[i]`` the verifier's cache of that sequence,
    holding every position but the last token's (a source may write past it, and must leave
    it as it found it).
    """

    name = "?"

    def propose(self, rows: list[int], contexts: list[list[int]], lengths: list[int],
                caches: list[SequenceCache] | None = None) -> list[Draft]:
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

    def propose(self, rows, contexts, lengths, caches=None):
        return [Draft(self.lookup(r, c, k)) for r, c, k in zip(rows, contexts, lengths)]


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

    def __init__(self, name: str, engine, confidence: float, margin: int, probs: Callable | None, generator,
                 shared: bool = True):
        self.name, self.engine, self.confidence = name, engine, confidence
        self.margin, self.probs, self.generator, self.shared = margin, probs, generator, shared
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
        return [i for i, _ in going], [t for _, t in going]

    def propose(self, rows, contexts, lengths, caches=None):
        drafts = [Draft([], [] if self.probs is not None else None) for _ in rows]
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
    # Model drafts: decayed counts of drafted tokens the verifier took and of rejections, whose
    # ratio estimates the per-token acceptance the draft length is chosen from (a prior of 4:1).
    taken: float = 4.0
    rejected: float = 1.0


class VerifyCost:
    """A verify pass's wall time as a + b * rows, fitted as the passes run (decayed least squares).

    What a drafted token costs the verifier is ``b``, in units of a plain step's share per
    sequence (``row_cost``). On a CPU at batch 1 that is a few percent (the weights are read
    once whatever the rows), so drafting long is cheap; at batch 8 the rows add up.
    Until the rows have varied, ``prior`` is assumed.
    """

    def __init__(self, prior: float = 0.03, decay: float = 0.95):
        self.prior, self.decay = prior, decay
        self.s = [0.0] * 5  # sums of w, w*x, w*x^2, w*y, w*x*y

    def add(self, rows: int, seconds: float) -> None:
        self.s = [self.decay * v for v in self.s]
        for j, v in enumerate((1.0, rows, rows * rows, seconds, rows * seconds)):
            self.s[j] += v

    def row_cost(self, sequences: int) -> float:
        """One more verified row, in units of one sequence's share of a plain step (B sequences, one row each)."""
        w, x, xx, y, xy = self.s
        var = w * xx - x * x
        if w < 4 or var < 0.5 * w * w:
            return self.prior
        b = (w * xy - x * y) / var
        a = (y - b * x) / w
        if a <= 0:
            return self.prior
        b = max(b, 0.0)
        return min(max(b * sequences / (a + b * sequences), 0.002), 1.0)

    def plain_step(self, sequences: int) -> float | None:
        """Seconds of a plain step of ``sequences`` one-row sequences (None before any pass)."""
        w, x, xx, y, xy = self.s
        if w == 0:
            return None
        var = w * xx - x * x
        if w < 4 or var < 0.5 * w * w:
            return y / w
        b = max((w * xy - x * y) / var, 0.0)
        return max((y - b * x) / w + b * sequences, 1e-9)


    def predict(self, rows: int) -> float | None:
        """Seconds of a pass over ``rows`` rows, from the fit (None until it has two distinct row counts)."""
        w, x, xx, y, xy = self.s
        var = w * xx - x * x
        if w < 4 or var < 0.5 * w * w:
            return None
        b = max((w * xy - x * y) / var, 0.0)
        return max((y - b * x) / w + b * rows, 1e-9)


class _DecayedFit:
    """Decayed least squares of y on (1, x1, x2): sums of the normal equations, older passes weigh less."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.m = [[0.0] * 3 for _ in range(3)]
        self.v = [0.0] * 3

    def add(self, x1: float, x2: float, y: float) -> None:
        f = (1.0, x1, x2)
        for r in range(3):
            self.v[r] = self.decay * self.v[r] + f[r] * y
            for c in range(3):
                self.m[r][c] = self.decay * self.m[r][c] + f[r] * f[c]

    @property
    def weight(self) -> float:
        return self.m[0][0]

    def mean(self) -> tuple[float, float, float]:
        w = self.m[0][0]
        return self.m[0][1] / w, self.m[0][2] / w, self.v[0] / w

    def varies(self, j: int) -> bool:
        """Whether x_j has varied enough to fit its slope (at least ~5 passes, spread of 1/2 or more)."""
        w = self.m[0][0]
        return w >= 4 and w * self.m[j][j] - self.m[0][j] ** 2 >= 0.5 * w * w

    def predict(self, x1: float, x2: float) -> float | None:
        """y at (x1, x2); slopes only along the inputs that varied, none negative; None until x1 varied."""
        if not self.varies(1):
            return None
        cols = [0, 1] + ([2] if self.varies(2) else [])
        m = torch.tensor([[self.m[r][c] for c in cols] for r in cols], dtype=torch.float64)
        v = torch.tensor([self.v[r] for r in cols], dtype=torch.float64)
        try:
            coef = torch.linalg.solve(m, v).tolist()
        except RuntimeError:  # singular: the inputs moved together
            return None
        if len(coef) == 3:
            coef[2] = max(coef[2], 0.0)
        coef[1] = max(coef[1], 0.0)
        # Refit the intercept through the mean with the (clamped) slopes.
        m1, m2, my = self.mean()
        slopes = coef[1] * (x1 - m1) + (coef[2] * (x2 - m2) if len(coef) == 3 else 0.0)
        return max(my + slopes, 1e-9)


class StepCosts:
    """Measured wall time of the verifier's two kinds of pass, as functions of B, the sequences stepped.

    A step where no sequence has a draft is a plain one-token step: with the caches rows of one
    pool it is the pooled decode step that speculation-off generation takes (one attention call
    per layer for the whole batch); its time is fitted as p + q * B. A step with drafts is a
    ragged verify pass (one attention call per sequence and layer), fitted as
    a + b * rows + s * B. At batch 1 the two cost about the same; at batch 8 on a CPU leaving the
    pooled step cost more than half a step by itself, so drafts must bring that back before
    they are verified (``choose_drafts``). Rows finish at different times, so B moves during a
    generation: until B has varied, the fits assume the cost does not depend on it.
    """

    def __init__(self, prior: float = 0.03):
        self.prior = prior
        self._plain = _DecayedFit()  # x1 = B
        self._verify = _DecayedFit()  # x1 = rows, x2 = B
        self.plain_seen: set[int] = set()  # batch sizes a plain step was measured at

    @staticmethod
    def _clip(guess: float | None, seconds: float, most: float) -> float:
        # Timing noise only ever adds (another process, a first call that measures kernels): one
        # sample counts at most ``most`` times the prediction. Tight for plain steps, whose
        # overestimate would make drafts look better than they are; loose for verify passes,
        # whose fit is rougher and whose overestimate only makes drafting more careful.
        return seconds if guess is None else min(seconds, most * guess)

    @property
    def measured(self) -> tuple[bool, bool]:
        """Whether a plain step and a verify pass have been measured."""
        return self._plain.weight > 0, self._verify.weight > 0

    def add_plain(self, sequences: int, seconds: float) -> None:
        guess = self.plain_step(sequences) if self.measured[0] else None
        self._plain.add(sequences, 0.0, self._clip(guess, seconds, 1.2))
        self.plain_seen.add(sequences)

    def add_verify(self, sequences: int, rows: int, seconds: float) -> None:
        guess = self.verify_time(sequences, rows) if self.measured[1] else None
        self._verify.add(rows, sequences, self._clip(guess, seconds, 3.0))

    def plain_step(self, sequences: int) -> float | None:
        """Seconds of a plain step of ``sequences`` one-row sequences (None before one was measured)."""
        if self._plain.weight == 0:
            return None
        got = self._plain.predict(sequences, 0.0)
        if got is not None:
            return got
        # Measured at one batch size only: a sequence more costs what a verified row does.
        mean_seq, _, mean_y = self._plain.mean()
        a, b = self._verify.predict(1.0, sequences), self._verify.predict(2.0, sequences)
        slope = b - a if a is not None and b is not None else 0.0
        return max(mean_y + slope * (sequences - mean_seq), 1e-9)

    def verify_time(self, sequences: int, rows: int) -> float | None:
        """Seconds of a ragged verify pass of ``rows`` rows over ``sequences`` sequences.

        Until the fit has varied rows: the line through the plain step (a draft-free pass) and
        the mean of the passes measured, which puts all of the extra on the rows, so that small
        drafts look cheap and get tried (and measured) before they are ruled out.
        """
        if self._verify.weight == 0:
            return None
        got = self._verify.predict(rows, sequences)
        if got is not None:
            return got
        plain = self.plain_step(sequences)
        mean_rows, mean_seq, mean_y = self._verify.mean()
        if plain is None:
            return mean_y
        if mean_rows <= mean_seq:
            return plain * (1 + self.prior * (rows - sequences))
        slope = max((mean_y - plain) / (mean_rows - mean_seq), 0.0)
        return plain + slope * (rows - sequences)

    def row_cost(self, sequences: int) -> float:
        """One more verified row, in units of one sequence's share of a plain step."""
        plain = self.plain_step(sequences)
        extra, base = self.verify_time(sequences, sequences + 1), self.verify_time(sequences, sequences)
        if plain is None or extra is None or base is None:
            return self.prior
        return min(max((extra - base) * sequences / plain, 0.002), 1.0)


# A verify pass is taken over the plain step only when it promises this much more: its expected
# tokens come from acceptance estimates that run optimistic (a prior of 4:1, streaks of a row
# that loops) and from costs measured on a shared machine. At batch 1 a drafted row costs a few
# percent of a step, so the margin changes little there; at batch 8 on a CPU a verified row costs
# nearly a sequence's share of a plain step, and the margin keeps marginal drafts out.
VERIFY_MARGIN = 1.1


def choose_drafts(candidates: list[tuple[int, int, float]], sequences: int, costs: StepCosts,
                  pooled: bool) -> list[int]:
    """The sequences whose drafts to verify this step: the subset with the most tokens per second.

    ``candidates``: (sequence, drafted tokens, expected accepted tokens). Drafts are taken in
    order of expected tokens per verified row; each prefix of that order is scored as tokens
    per second of its verify pass, against ``sequences`` tokens per plain step (the pooled
    step when ``pooled``). Until both kinds of pass were measured, the one not yet measured is
    taken: every draft first, then (with a pool) none, and none again at each batch size the
    pooled step has not run at (as rows finish, B falls, and so does a plain step's cost).
    """
    if not candidates:
        return []
    has_plain, has_verify = costs.measured
    if not has_verify:
        return [i for i, _, _ in candidates]
    if pooled and sequences not in costs.plain_seen:  # a batch size new to the pooled step (rows finished)
        return []
    plain = costs.plain_step(sequences)
    if plain is None:
        return []
    order = sorted(candidates, key=lambda c: -c[2] / max(c[1], 1))
    best, best_rate = 0, VERIFY_MARGIN * sequences / plain
    rows, tokens = sequences, float(sequences)
    for m, (_, k, e) in enumerate(order, 1):
        rows += k
        tokens += e
        t = costs.verify_time(sequences, rows)
        if t is not None and tokens / t > best_rate:
            best, best_rate = m, tokens / t
    return [i for i, _, _ in order[:best]]


def expected_accepted(alpha: float, k: int) -> float:
    """Expected accepted tokens of a k-token draft, each accepted with probability ``alpha`` until the first rejection."""
    if alpha >= 1:
        return float(k)
    return alpha * (1.0 - alpha**k) / (1.0 - alpha)


@dataclass
class SpeculativeResult(GenerationResult):
    """``GenerationResult`` plus what speculation did (``speculative``: per source and overall)."""

    speculative: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The decoding loop


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


def make_sources(engine, temperature: float, top_k, top_p, generator, batch: int = 1) -> list[DraftSource]:
    cfg = engine.config.speculative
    probs = make_probs(temperature, top_k, top_p) if temperature > 0 else None
    out: list[DraftSource] = []
    for name in usable_sources(engine, batch):
        if name == "lookup":
            out.append(PromptLookup(cfg.lookup_min_ngram, cfg.lookup_max_ngram))
        else:
            out.append(ModelDraft(name, draft_engine(engine, name), cfg.confidence, cfg.max_draft, probs, generator,
                                  shared=not engine.config.kv.enabled))
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
    the steps it drafted in, tokens drafted and accepted, and its acceptance rate; engine
    passes of each kind (``plain_passes``, ``verify_passes``), drafts made but not verified
    (``declined_drafts``) and rows verified without a draft beside others' drafts.
    """
    from .generate import make_sampler

    spec, cfg = engine.spec, engine.config.speculative
    cfg.check_model(spec.n_layers)
    rows, eos = _check_request(prompts, max_new_tokens, spec.max_positions, eos_token_id, stop_strings, tokenizer, spec.vocab_size)
    make_sampler(temperature, top_k, top_p, seed)  # validates the sampling settings like plain generate
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)
    sampling = temperature > 0
    probs_of = make_probs(temperature, top_k, top_p) if sampling else None
    sources = sources if sources is not None else make_sources(engine, temperature, top_k, top_p, gen, len(rows))
    device = next(engine.model.parameters()).device
    K = cfg.max_draft
    capacities = [r.numel() + max_new_tokens + K + 1 for r in rows]  # room for the last verify pass's draft
    if engine.config.kv.enabled:  # caches that shrink row by row; the margin keeps rollbacks exact
        caches = [SequenceCache(spec.n_layers, capacity=c, margin=K) for c in capacities]
    else:  # rows of one pool, as plain generation: a step without drafts is its pooled one-token step
        caches = new_caches(engine, capacities)
    contexts = [r.tolist() for r in rows]
    out: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    policy = [{s.name: _RowPolicy(min(cfg.initial_draft, cfg.max_draft)) for s in sources} for _ in rows]
    stats = {s.name: SourceStats() for s in sources}
    plain = SourceStats()  # steps where a sequence had no draft
    decode_ledger = Ledger(n_layers=spec.n_layers)
    total = Ledger(n_layers=spec.n_layers)
    costs = StepCosts()
    declined_run, probe_after = 0, cfg.retry_after
    realized = None  # running gain of the verify passes at a batch: their tokens per second against a plain step's
    # Engine passes by kind, drafts made but not verified, rows verified without a draft beside others' drafts.
    passes = {"plain": 0, "verify": 0, "declined": 0, "mixed_rows": 0}
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
        else argmax(logits).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    active = [i for i in range(len(rows)) if not emit(i, first[i])]
    step = 0
    while active:
        step += 1
        B = len(active)
        row_cost = costs.row_cost(B)
        # 1. Drafts: each row asks its sources best expected rate first (ties: in the configured
        # order); a source with nothing to propose for a row passes it on to the next.
        drafts: dict[int, tuple[str, Draft]] = {}
        plain_s = costs.plain_step(B)
        queue = {}
        for i in active:
            room = max_new_tokens - len(out[i]) - 1  # the verifier adds one token of its own
            if room > 0:
                ranked = [(-_expected_rate(policy[i][src.name], src, row_cost, plain_s, cfg), n, src)
                          for n, src in enumerate(sources) if policy[i][src.name].off_until <= step]
                queue[i] = [(src, room) for *_, src in sorted(ranked, key=lambda x: x[:2])]
        while queue:
            for src in sources:
                asking = [(i, min(policy[i][src.name].length, room)) for i, q in queue.items() for s_, room in q[:1] if s_ is src]
                if not asking:
                    continue
                proposals = src.propose([i for i, _ in asking], [contexts[i] for i, _ in asking], [k for _, k in asking],
                                        [caches[i] for i, _ in asking])
                for (i, _), d in zip(asking, proposals):
                    if d.tokens:
                        drafts[i] = (src.name, d)
                    elif d.passes:  # a model draft that spent passes and proposed nothing: a cost with no gain
                        _adapt(policy[i][src.name], 0, 0, step, cfg, row_cost, _cost(src, d, costs, B))
                    queue[i] = [] if d.tokens else queue[i][1:]
            queue = {i: q for i, q in queue.items() if q}
        # 2. Which drafts to verify: those whose expected tokens pay for their rows and, at a
        # batch, for leaving the pooled one-token step (measured costs, per-row acceptance).
        pooled = caches[active[0]].pool is not None
        # One sequence: the per-sequence policy already weighs the draft against a plain step
        # by the same measured costs (``_adapt``), and a declined draft leaves its acceptance
        # estimate stale (lookup's matches come in bursts), so every draft is verified.
        keep = list(drafts) if B == 1 else choose_drafts([(i, len(d.tokens), expected_accepted(_alpha(policy[i][name]), len(d.tokens)))
                              for i, (name, d) in drafts.items()], B, costs, pooled)
        if B > 1 and realized is not None and realized < 1.0:
            keep = []  # the passes chosen by expectation have not paid in fact: plain steps (and probes)
        if drafts and not keep:
            # Declining rests on measurements that only verify passes renew (one slow pass, and
            # drafting would stay off for good): after a run of declined steps, verify the
            # likeliest draft anyway (a pass of few rows), the run doubling each time.
            declined_run += 1
            if declined_run >= probe_after:
                keep = [max(drafts, key=lambda i: _alpha(policy[i][drafts[i][0]]))]
                declined_run, probe_after = 0, 2 * probe_after
        elif keep:
            declined_run = 0
        passes["declined"] += len(drafts) - len(keep)
        drafts = {i: drafts[i] for i in keep}
        # 3. One pass of the verifier: the plain one-token step when no row has a draft, else a
        # verify pass over [last token, draft...] of every active row.
        ids, pos, segments = [], [], []
        for i in active:
            toks = [contexts[i][-1]] + (drafts[i][1].tokens if i in drafts else [])
            start = len(ids)
            ids += toks
            pos += range(caches[i].length, caches[i].length + len(toks))
            segments.append((start, len(ids)))
        tv = time.perf_counter()
        if drafts:
            logits, ledger = engine.run(torch.tensor(ids, device=device), torch.tensor(pos, device=device), segments,
                                        [caches[i] for i in active])
        else:
            logits, ledger = decode_one_token(engine, torch.tensor(ids, device=device), [caches[i] for i in active])
        logits = logits.float()
        best = None if sampling else argmax(logits).tolist()  # one call for the whole batch (it syncs)
        took = time.perf_counter() - tv
        passes["verify" if drafts else "plain"] += 1
        passes["mixed_rows"] += B - len(drafts) if drafts else 0
        if drafts:
            costs.add_verify(B, len(ids), took)
        else:
            costs.add_plain(B, took)
            if not pooled:  # a plain step is a ragged pass without drafts: one more point of the same fit
                costs.add_verify(B, len(ids), took)
        decode_ledger.merge(ledger)
        total.merge(ledger)
        # 4. Accept, emit, roll back, adapt.
        still = []
        pass_emitted = 0
        for (a, b), i in zip(segments, active):
            name, d = drafts.get(i, (None, Draft([])))
            base = caches[i].length - (b - a)  # the cache length before this step
            if sampling:
                n, nxt = accept_sampled(probs_of(logits[a:b]), d.tokens, d.probs, gen)
            else:
                n = 0
                while n < len(d.tokens) and d.tokens[n] == best[a + n]:
                    n += 1
                nxt = best[a + n]
            if caches[i].length != base + 1 + n:
                caches[i].truncate(base + 1 + n)
            done = False
            emitted = 0
            for tok in d.tokens[:n] + [nxt]:
                emitted += 1
                pass_emitted += 1
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
                _adapt(policy[i][name], len(d.tokens), n, step, cfg, row_cost, _cost(src, d, costs, B))
                src.update(i, n)
            if not done:
                still.append(i)
        plain_s = costs.plain_step(B)
        if drafts and B > 1 and plain_s:
            gain = (pass_emitted / took) / (B / plain_s)
            realized = gain if realized is None else 0.7 * realized + 0.3 * gain
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
        "plain_passes": passes["plain"], "verify_passes": passes["verify"], "declined_drafts": passes["declined"],
        "undrafted_rows_in_verify": passes["mixed_rows"],
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


def _cost(src, d: Draft, verify: StepCosts, sequences: int) -> tuple[float, float] | None:
    """A model draft's (time spent on this sequence this step, one pass's time), in plain steps; None for lookup."""
    if not isinstance(src, ModelDraft):
        return None
    plain = verify.plain_step(sequences)
    # Before both are measured: a draft pass at half a plain step (a low-bit draft's weight bytes).
    r = src.seconds_per_pass / plain if src.seconds_per_pass and plain else 0.5
    return d.passes * r, r


def best_length(alpha: float, token_cost: float, max_draft: int) -> tuple[int, float]:
    """The draft length k that maximises expected tokens per unit of time, and that rate.

    A draft of k tokens, each accepted with probability ``alpha`` until the first rejection,
    yields (1 - alpha^(k+1)) / (1 - alpha) tokens (the verifier adds one) and costs a plain
    step plus ``token_cost`` plain steps per drafted token (its verify row, and its draft pass
    for a model draft). A plain step's rate is 1.
    """
    best, rate = 1, 0.0
    for k in range(1, max_draft + 1):
        tokens = k + 1.0 if alpha >= 1 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        now = tokens / (1.0 + k * token_cost)
        if now > rate:
            best, rate = k, now
    return best, rate


def _alpha(pol: _RowPolicy) -> float:
    """A sequence's estimated per-token acceptance for one source (decayed counts, ``_RowPolicy``)."""
    return pol.taken / (pol.taken + pol.rejected)


def _expected_rate(pol: _RowPolicy, src, row_cost: float, plain_s: float | None, cfg) -> float:
    """Tokens per unit of time a source promises for a sequence, at its best length (``best_length``)."""
    token_cost = row_cost
    if isinstance(src, ModelDraft):
        token_cost += src.seconds_per_pass / plain_s if src.seconds_per_pass and plain_s else 0.5
    return best_length(pol.taken / (pol.taken + pol.rejected), token_cost, cfg.max_draft)[1]


def _adapt(pol: _RowPolicy, drafted: int, accepted: int, step: int, cfg, row_cost: float,
           model_cost: tuple[float, float] | None = None) -> None:
    """The draft length that pays best at the measured acceptance and costs; off while drafting does not pay.

    Per-token acceptance is estimated from decayed counts of accepted tokens and rejections.
    ``row_cost``: a verified row, in plain steps (``VerifyCost.row_cost``); ``model_cost``: a
    model draft's (this step's draft time, one pass), in plain steps (``_cost``), None for
    prompt lookup (free to draft) or before it is measured. A model draft is also switched off
    while its realised gain (tokens per unit of time, against 1 for a plain step) is under 1.
    """
    pol.taken = 0.9 * pol.taken + accepted
    pol.rejected = 0.9 * pol.rejected + (1 if accepted < drafted or drafted == 0 else 0)
    alpha = pol.taken / (pol.taken + pol.rejected)
    if drafted:
        pol.acceptance = 0.7 * pol.acceptance + 0.3 * (accepted / drafted)
    token_cost = row_cost + (model_cost[1] if model_cost else 0.0)
    pol.length, rate = best_length(alpha, token_cost, cfg.max_draft)
    off = rate < 1.0 or (drafted and pol.acceptance < cfg.off_below)
    if model_cost is not None:
        now = (accepted + 1) / (1.0 + model_cost[0] + drafted * row_cost)
        pol.gain = now if pol.gain is None else 0.7 * pol.gain + 0.3 * now
        off = off or pol.gain < 1.0
    if off:
        _switch_off(pol, step, cfg)
    elif drafted and accepted == drafted:
        pol.backoff = 0


def _switch_off(pol: _RowPolicy, step: int, cfg) -> None:
    pol.backoff = cfg.retry_after if pol.backoff == 0 else 2 * pol.backoff
    pol.off_until = step + pol.backoff
    pol.acceptance, pol.gain = 1.0, None  # a fresh start when it retries
