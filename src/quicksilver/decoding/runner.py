"""The runner contract, and the passes every decode path is built from.

A runner is what runs the model's layers over rows of several sequences: the ``Engine``
(``Engine.run``). Its contract is written below as a Protocol. A pooled one-token step may
instead run through another step implementation of the same engine (the compiled layer loop,
``quicksilver.compiled``), chosen by measurement once per machine and shape; each falls back to
the runner's own loop where it does not apply or fails.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .. import compiled, native_decode
from ..cache import CachePool, SequenceCache
from ..ledger import Ledger


class Runner(Protocol):
    """What the decoding core needs of an engine.

    ``run(ids, pos, segments, caches, logit_rows=None)``: ``ids``/``pos`` (N,) token ids and
    their true positions, rows of one sequence contiguous and in order; ``segments`` one
    (start, stop) row range per sequence; ``caches`` one ``SequenceCache`` (or None) per
    segment, whose entries the segment's queries also see and to which its new K/V are
    appended; ``logit_rows`` (n,) the rows whose logits to return (None: every row). Returns
    (logits (n, V), Ledger) and leaves each cache's ``length`` at its sequence's next position.
    """

    model: torch.nn.Module
    spec: object  # quicksilver.spec.ArchSpec
    config: object  # quicksilver.config.Config

    def run(self, ids: torch.Tensor, pos: torch.Tensor, segments: list[tuple[int, int]], caches: list,
            logit_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, Ledger]: ...


def new_caches(engine: Runner, capacities: Sequence[int], margin: int = 0) -> list[SequenceCache]:
    """One cache per sequence, preallocated: rows of one pool (batched decode attention) unless
    KV skipping is on, whose caches shrink row by row and so get buffers of their own.

    ``margin``: window eviction keeps this many extra positions, so that a speculative
    rollback by up to ``margin`` tokens never needs an evicted entry.
    """
    spec = engine.spec
    if engine.config.kv.enabled:
        return [SequenceCache(spec.n_layers, capacity=c, margin=margin) for c in capacities]
    param = next(engine.model.parameters())
    return CachePool(spec.n_layers, len(capacities), max(capacities), spec.n_kv_heads, spec.head_dim,
                     param.dtype, param.device, margin).rows


def prefill(engine: Runner, prompt: torch.Tensor, cache: SequenceCache):
    """Run the prompt through every layer, filling ``cache``; logits of the last position (1, V)."""
    return prefill_batch(engine, [prompt], [cache])


def prefill_batch(engine: Runner, prompts: Sequence[torch.Tensor], caches: Sequence[SequenceCache]):
    """Prefill ragged prompts together: one pass whose linears run over every prompt's rows.

    The prompts are concatenated (no padding); each attends only to itself (one segment per
    prompt). Returns the logits of each prompt's last position (B, V) and the ledger.
    """
    device = prompts[0].device
    lengths = [p.numel() for p in prompts]
    ids = torch.cat(list(prompts))
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    ends = torch.tensor(lengths, device=device).cumsum(0)
    segments = [(int(b) - n, int(b)) for b, n in zip(ends, lengths)]
    return engine.run(ids, pos, segments, list(caches), logit_rows=ends - 1)


def decode_one_token(engine: Runner, tokens: torch.Tensor, caches: Sequence[SequenceCache], compile: bool = False):
    """One step for several sequences: ``tokens`` (B,) at each cache's next position; logits (B, V).

    The step runs the native decode step where it applies and measured faster than the eager loop
    (``quicksilver.native_decode``), else, with ``compile``, the compiled layer loop where it
    applies (``quicksilver.compiled``), else the runner's own loop.
    """
    pos = torch.tensor([c.length for c in caches], device=tokens.device)
    segments = [(i, i + 1) for i in range(len(caches))]
    if native_decode.applies(engine, segments, caches) and native_decode.pays(engine, len(caches)):
        out = native_decode.step(engine, tokens, pos, list(caches))
        if out is not None:
            return out
    if compile and compiled.applies(engine, segments, caches):
        out = compiled.step(engine, tokens, pos, list(caches))
        if out is not None:
            return out
    return engine.run(tokens, pos, segments, list(caches))


def verify(engine: Runner, feeds: list[list[int]], caches: Sequence[SequenceCache], device):
    """One pass over several sequences, each fed a few tokens (its last token and a draft) at its
    cache's next positions; logits of every row (N, V), the ledger and each sequence's row range."""
    ids, pos, segments = [], [], []
    for toks, cache in zip(feeds, caches):
        start = len(ids)
        ids += toks
        pos += range(cache.length, cache.length + len(toks))
        segments.append((start, len(ids)))
    logits, ledger = engine.run(torch.tensor(ids, device=device), torch.tensor(pos, device=device), segments, list(caches))
    return logits, ledger, segments


def wants_compiled(engine: Runner, sequences: int, steps: int) -> bool:
    """Whether ``steps`` one-token steps of ``sequences`` sequences should run the compiled loop (measured).

    Never where the native step serves the engine and measured faster than the eager loop at this
    many rows: it runs first (``decode_one_token``), so measuring the compiled loop would only cost
    a compile (tens of seconds on a CPU; a server's first requests at a new batch size waited on it)."""
    if native_decode.native_step(engine) is not None and native_decode.pays(engine, sequences):
        return False
    return compiled.wanted(engine, sequences, steps)
