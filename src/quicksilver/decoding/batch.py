"""The decode core: one batch of sequences, stepped one pass at a time, for every front end.

``generate`` drives a batch to the end; the server's scheduler admits and cancels sequences
between steps. Each step is one pass of the engine for every active sequence: the plain
one-token step (pooled, or the compiled loop where it was measured faster), or, with
speculative decoding on, a verify pass over [last token, draft...] of every sequence whose
draft was chosen (``speculative.Drafter``), rolled back exactly to what was accepted. Greedy
rows take the verifier's argmax (so the output equals decoding one token at a time); sampled
rows use speculative sampling (so every token follows the full model's distribution), each with
its own generator. Then the one stop check (``stop.StopCheck``) decides which sequences end.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..cache import SequenceCache
from ..kernels import argmax
from ..ledger import Ledger
from .runner import Runner, decode_one_token, prefill, prefill_batch, verify, wants_compiled
from .sampling import Sampler
from .speculative import Drafter, accept_sampled, make_sources
from .speculative.drafter import NO_DRAFT
from .stop import StopCheck

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sequence of a decode batch: its prompt, cache, sampler and stop rules, and what it produced.

    ``on_token(seq, token)`` is called for every emitted token; ``tag`` is the front end's own
    (the server's request). ``finish_reason``: ``eos``, ``stop_string``, ``length``, or an error
    message's ``error``; ``error`` holds the exception of a sequence that failed alone.
    """

    prompt: torch.Tensor  # (T,) token ids on the model's device
    cache: SequenceCache
    sampler: Sampler
    stop: StopCheck
    on_token: Optional[Callable[["Sequence", int], None]] = None
    tag: Any = None
    tokens: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)  # prompt and generated tokens (what drafts look up)
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self):
        self.context = self.prompt.tolist()

    @property
    def max_new_tokens(self) -> int:
        return self.stop.max_new_tokens

    @property
    def text(self) -> str:
        """The decoded text so far (when the stop check keeps it)."""
        return self.stop.text

    def emit(self, token: int) -> bool:
        """Append a token; True when the sequence is finished."""
        self.tokens.append(token)
        self.context.append(token)
        self.finish_reason = self.stop(self.tokens)
        if self.on_token is not None:  # after the stop check: the listener sees why it ends, and the text
            self.on_token(self, token)
        return self.finish_reason is not None


class DecodeBatch:
    """Sequences decoded together, one pass of ``engine`` per ``step``.

    Parameters
    ----------
    engine : the runner (an ``Engine``); speculative decoding runs when its config turns it on
    compile : run plain one-token steps through the compiled loop (True/False), or decide per
        step by measurement (None: a server, whose steps keep coming)
    speculative_batch : the batch size the draft sources are chosen for (``usable_sources``)

    Attributes: ``active`` (sequences still decoding), ``ledger`` (every pass), ``decode_ledger``
    (the passes after prefill), ``drafter`` (None without speculative decoding).
    """

    def __init__(self, engine: Runner, compile: bool | None = False, speculative_batch: int = 1):
        self.engine, self.compile = engine, compile
        spec = engine.spec
        self.device = next(engine.model.parameters()).device
        self.active: list[Sequence] = []
        self.ledger = Ledger(n_layers=spec.n_layers)
        self.decode_ledger = Ledger(n_layers=spec.n_layers)
        self.drafter: Drafter | None = None
        cfg = engine.config.speculative
        if cfg.enabled:
            cfg.check_model(spec.n_layers)
            self.drafter = Drafter(make_sources(engine, speculative_batch), cfg)

    @property
    def margin(self) -> int:
        """How far a step may roll a cache back (a rejected draft): window eviction keeps this much more."""
        return 0 if self.drafter is None else self.engine.config.speculative.max_draft

    @property
    def extra_entries(self) -> int:
        """Cache entries past a sequence's last token that a step may write (a draft and the verifier's own token)."""
        return 0 if self.drafter is None else self.margin + 1

    # ---- admission --------------------------------------------------------------------------

    def admit(self, seqs: list[Sequence], isolate: bool = False) -> list[Sequence]:
        """Prefill the newcomers together (one pass), emit their first tokens; those that go on join
        the batch. Returns the sequences that finished (or, with ``isolate``, failed alone)."""
        if not seqs:
            return []
        try:
            logits, ledger = prefill_batch(self.engine, [s.prompt for s in seqs], [s.cache for s in seqs])
            self.ledger.merge(ledger)
            outcome = [logits[j : j + 1] for j in range(len(seqs))]
        except Exception:
            if not isolate:
                raise
            outcome = []  # find the culprit: each prompt alone, from an empty cache
            for s in seqs:
                s.cache.truncate(0)
                try:
                    logits, ledger = prefill(self.engine, s.prompt, s.cache)
                    self.ledger.merge(ledger)
                    outcome.append(logits)
                except Exception as e:
                    outcome.append(e)
        done = []
        for s, out in zip(seqs, outcome):
            if isinstance(out, Exception):
                self._fail(s, out, done)
                continue
            try:
                finished = s.emit(s.sampler.sample(out[0]) if not s.sampler.greedy else int(argmax(out[0])))
            except Exception as e:
                if not isolate:
                    raise
                self._fail(s, e, done)
                continue
            (done if finished else self.active).append(s)
        self.active.sort(key=lambda s: s.cache.slot)  # pool rows in order: a step reads them as one view
        for s in done:
            self._leave(s)
        return done

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the batch (a cancelled request) before the next step."""
        if seq in self.active:
            self.active.remove(seq)
            self._leave(seq)

    # ---- one step ---------------------------------------------------------------------------

    def step(self, isolate: bool = False) -> list[Sequence]:
        """One pass for every active sequence; returns those that finished (or failed alone).

        With ``isolate`` a pass that raises is undone (every cache restored) and each sequence
        runs a plain step alone, so that a failure fails only its own sequence.
        """
        seqs = self.active
        if not seqs:
            return []
        snaps = [s.cache.snapshot() for s in seqs] if isolate else None
        try:
            results = self._pass(seqs, use_drafts=True)
        except Exception:
            if not isolate:
                raise
            results = []
            for s, snap in zip(seqs, snaps):
                s.cache.restore(snap)
                try:
                    results += self._pass([s], use_drafts=False)
                except Exception as e:
                    results.append((s, e))
        done, going = [], []
        for s, out in results:
            if isinstance(out, Exception):
                self._fail(s, out, done)
            elif out:
                done.append(s)
            else:
                going.append(s)
        self.active = going
        for s in done:
            self._leave(s)
        return done

    def _pass(self, seqs: list[Sequence], use_drafts: bool) -> list[tuple[Sequence, Any]]:
        """One engine pass over ``seqs``: (sequence, finished?) for each, in order."""
        B, drafter = len(seqs), self.drafter if use_drafts else None
        caches = [s.cache for s in seqs]
        pooled = caches[0].pool is not None
        drafts = drafter.propose(seqs, pooled) if drafter is not None else {}
        t0 = time.perf_counter()
        if drafts:
            feeds = [[s.context[-1]] + (drafts[i][1].tokens if i in drafts else []) for i, s in enumerate(seqs)]
            logits, ledger, segments = verify(self.engine, feeds, caches, self.device)
        else:
            use = self.compile if self.compile is not None else wants_compiled(self.engine, B, 1)
            tokens = torch.tensor([s.context[-1] for s in seqs], device=self.device)
            logits, ledger = decode_one_token(self.engine, tokens, caches, use)
            segments = [(i, i + 1) for i in range(B)]
        best = argmax(logits).tolist() if any(s.sampler.greedy for s in seqs) else None  # one call for the batch (it syncs)
        took = time.perf_counter() - t0
        if drafter is not None:
            drafter.timed(B, segments[-1][1], len(drafts), took, pooled)
        self.ledger.merge(ledger)
        self.decode_ledger.merge(ledger)
        results, emitted_all = [], 0
        for i, (s, (a, b)) in enumerate(zip(seqs, segments)):
            name, d = drafts.get(i, (None, NO_DRAFT))
            base = s.cache.length - (b - a)  # the cache length before this pass
            if s.sampler.greedy:
                n = 0
                while n < len(d.tokens) and d.tokens[n] == best[a + n]:
                    n += 1
                nxt = best[a + n]
            else:
                n, nxt = accept_sampled(s.sampler.probs(logits[a:b]), d.tokens, d.probs, s.sampler.generator)
            if s.cache.length != base + 1 + n:
                s.cache.truncate(base + 1 + n)
            finished, emitted = False, 0
            for tok in d.tokens[:n] + [nxt]:
                emitted += 1
                if s.emit(tok):
                    finished = True
                    break
            emitted_all += emitted
            if drafter is not None:
                drafter.accepted(s, name, d, n, emitted, B)
            results.append((s, finished))
        if drafter is not None:
            drafter.after_pass(bool(drafts), B, emitted_all, took)
        return results

    def _fail(self, s: Sequence, error: BaseException, done: list) -> None:
        s.error, s.finish_reason = error, "error"
        done.append(s)

    def _leave(self, s: Sequence) -> None:
        if self.drafter is not None:
            self.drafter.forget(s)
